"""Knobs: configuration fields that carry their own help and validity, and the one error that names them.

A configuration is a frozen dataclass whose fields are made with ``knob``:
name, type and default come from the field, help and validity from its
metadata.  The command line (``layerpipe.options``), TOML files and Python
keyword arguments are all read from these fields, so each knob is defined
once.  ``ConfigError`` keeps the field, the value and what would be valid;
each entry point renders the field in its own spelling: ``--group-size 3`` on
the command line, ``group_size=3`` in Python, ``group_size = 3`` in a TOML
file.  Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], "str | None"]
"""A validity rule: returns ``None`` for a valid value, else what would be valid (e.g. ``must be at least 1``)."""


def knob(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    metavar: str | None = None,
    short: str | None = None,
    default_text: str | None = None,
    **field_options: Any,
) -> Any:
    """Return a dataclass field carrying its help text, validity rule and command-line hints.

    ``default_text`` replaces the default in ``--help`` when the default is
    decided later (e.g. ``None`` meaning "chosen by the schedule").
    """
    metadata = {"help": help, "check": check, "metavar": metavar, "short": short, "default_text": default_text}
    if "default_factory" in field_options:
        return dataclasses.field(metadata=metadata, **field_options)
    return dataclasses.field(default=default, metadata=metadata, **field_options)


# ---------------------------------------------------------------- spellings
@dataclass(frozen=True)
class Spelling:
    """How an entry point writes a field's name, a value for it, and a switch (a true boolean) turned on."""

    name: Callable[[str], str]
    assignment: Callable[[str, Any], str]
    switch: Callable[[str], str] = lambda field: field


PYTHON = Spelling(lambda field: field, lambda field, value: f"{field}={value!r}", lambda field: f"{field}=True")
COMMAND_LINE = Spelling(
    lambda field: "--" + field.replace("_", "-"),
    lambda field, value: f"--{field.replace('_', '-')}" + ("" if value is None else f" {_plain(value)}"),
    lambda field: "--" + field.replace("_", "-"),
)


def toml_spelling(path: str) -> Spelling:
    """Return the spelling of keys in the TOML file ``path``."""
    return Spelling(
        lambda field: field, lambda field, value: f"{path}: {field} = {value!r}", lambda field: f"{field} = true"
    )


def _plain(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


_MENTION = re.compile(r"`([a-z_]+)`")
_SWITCH = re.compile(r"`([a-z_]+)=True`")


class ConfigError(ValueError):
    """Bad user input: ``field`` had ``value``; ``valid`` says what would be valid.

    ``valid`` may mention other fields as ```name```, and a switch turned on
    as ```name=True```; ``render`` writes them, and the field itself, in an
    entry point's spelling (``--name`` for both on the command line).  ``str()``
    uses Python's (``group_size=3: must be between ranks (4) and microbatches (8)``)
    unless ``spelled`` chose another.
    """

    def __init__(self, field: str, value: Any, valid: str):
        self.field, self.value, self.valid = field, value, valid
        self.spelling = PYTHON
        super().__init__(self.render(PYTHON))

    def __str__(self) -> str:
        return self.render(self.spelling)

    def spelled(self, spelling: Spelling) -> ConfigError:
        """Return this error, to be shown in ``spelling`` (field and value are kept for callers)."""
        self.spelling = spelling
        return self

    def render(self, spelling: Spelling) -> str:
        """Return the message with field names in ``spelling``."""
        reason = _SWITCH.sub(lambda match: spelling.switch(match.group(1)), self.valid)
        reason = _MENTION.sub(lambda match: spelling.name(match.group(1)), reason)
        return f"{spelling.assignment(self.field, self.value)}: {reason}"


# ---------------------------------------------------------------- validity rules
def whole(minimum: int = 1) -> Check:
    """Return the rule "a whole number of at least ``minimum``"."""

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"must be a whole number of at least {minimum}"
        return None

    return check


def optional(rule: Check) -> Check:
    """Return ``rule`` that also accepts ``None``."""
    return lambda value: None if value is None else rule(value)


def number(minimum: float = 0.0, *, above: bool = False, infinite: bool = False) -> Check:
    """Return the rule "a number ≥ ``minimum``" (``> minimum`` when ``above``; infinity only when ``infinite``)."""

    def check(value: Any) -> str | None:
        relation = "above" if above else "of at least"
        wanted = (
            f"must be a number {relation} {minimum:g} (or inf)"
            if infinite
            else f"must be a finite number {relation} {minimum:g}"
        )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return wanted
        if math.isinf(value) and not (infinite and value > 0):
            return wanted
        if value < minimum or (above and value == minimum):
            return wanted
        return None

    return check


def one_of(choices: Sequence[Any]) -> Check:
    """Return the rule "one of ``choices``"."""
    return lambda value: None if value in choices else "choose one of " + ", ".join(map(str, choices))


# ---------------------------------------------------------------- reading
def knobs(cls: type) -> list[dataclasses.Field]:
    """Return the fields of ``cls`` made with ``knob`` (those with help), in order."""
    return [field for field in dataclasses.fields(cls) if "help" in field.metadata]


def check_fields(config: Any) -> None:
    """Raise ``ConfigError`` for the first knob of ``config`` whose value breaks its own rule."""
    for field in knobs(type(config)):
        rule = field.metadata.get("check")
        value = getattr(config, field.name)
        reason = rule(value) if rule is not None else None
        if reason is not None:
            raise ConfigError(field.name, value, reason)


_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}
"""How a refusal names each field type."""


def field_type(cls: type, name: str) -> str:
    """Return the declared type of field ``name`` as written (``int``, ``int | None``, ``float``, ...)."""
    for field in dataclasses.fields(cls):
        if field.name == name:
            return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    raise KeyError(name)


def parse_text(cls: type, name: str, text: str) -> Any:
    """Return command-line ``text`` for field ``name`` of ``cls`` as the field's type.

    Refuses, with ``ConfigError``, text that is not of that type; whether the
    value is valid is the field's rule's to say.
    """
    declared = field_type(cls, name)
    if declared.endswith("| None") and text.lower() == "none":
        return None
    base = declared.split("|")[0].strip()
    if base == "PerStage":  # one number for every stage, or one per stage
        try:
            values = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise ConfigError(name, text, "must be a number, or one number per stage (comma-separated)") from None
        return values[0] if len(values) == 1 else values
    try:
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base == "bool":
            return {"true": True, "false": False}[text.lower()]
    except (ValueError, KeyError):
        raise ConfigError(name, text, f"must be {_KIND_WORDS[base]}") from None
    return text


def check_type(cls: type, name: str, value: Any) -> None:
    """Refuse, with ``ConfigError``, a value (from TOML or Python) that is not of field ``name``'s type."""
    declared = field_type(cls, name)
    if value is None and declared.endswith("| None"):
        return
    if "tuple[str" in declared and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return  # one text per stage, e.g. recompute = ["full", "none"]
    base = declared.split("|")[0].strip()
    accepted = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}.get(base)
    if accepted is None:
        return
    if (isinstance(value, bool) and base != "bool") or not isinstance(value, accepted):
        raise ConfigError(name, value, f"must be {_KIND_WORDS[base]}")
