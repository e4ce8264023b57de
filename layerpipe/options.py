"""Command-line options and TOML keys generated from configuration knobs (``layerpipe.knobs``).

``add_knobs`` adds one option per knob of a configuration to an argparse
parser, with the knob's help and its default; ``given`` reads back the
options the user gave; ``read_toml`` reads a TOML file of the same knobs.
Values are parsed and checked by the knobs themselves, so the command line,
TOML and Python refuse the same bad values with the same words.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Iterable, Sequence
from typing import Any

from .knobs import COMMAND_LINE, ConfigError, check_type, field_type, knobs, parse_text, toml_spelling


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _default_text(field: dataclasses.Field, default: Any) -> str:
    text = field.metadata.get("default_text")
    if text is not None:
        return text
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


def add_knobs(
    parser: argparse.ArgumentParser | Any, defaults: Any, skip: Iterable[str] = (), shown: dict[str, str] | None = None
) -> None:
    """Add an option for every knob of the configuration ``defaults`` (an instance: its values are the defaults shown,
    or the text ``shown`` gives a knob by name).

    Options default to ``None`` (not given); values stay text until the
    knob parses them.  A boolean knob gets ``--name`` and ``--no-name``.
    """
    for field in knobs(type(defaults)):
        if field.name in skip:
            continue
        default = (shown or {}).get(field.name) or _default_text(field, getattr(defaults, field.name))
        help_text = f"{field.metadata['help']} (default: {default})"
        names = [COMMAND_LINE.name(field.name)] + ([field.metadata["short"]] if field.metadata.get("short") else [])
        if field.type == "bool":
            parser.add_argument(
                *names,
                dest=field.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text.replace("%", "%%"),
            )
            continue
        parser.add_argument(
            *names,
            dest=field.name,
            default=None,
            metavar=field.metadata.get("metavar") or "VALUE",
            help=help_text.replace("%", "%%"),
        )


def given(arguments: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Return the knobs of ``cls`` the user gave on the command line, parsed to their types.

    Refuses, with ``ConfigError``, text that is not of a knob's type.
    """
    values = {}
    for field in knobs(cls):
        text = getattr(arguments, field.name, None)
        if text is not None:
            values[field.name] = text if isinstance(text, bool) else parse_text(cls, field.name, text)
    return values


def read_toml(
    path: str, classes: Iterable[type], option: str = "config", ignore: Iterable[str] = ()
) -> dict[type, dict[str, Any]]:
    """Return the keys of TOML file ``path`` grouped by the configuration class whose knob each one is.

    ``option`` names the file's option in errors; keys in ``ignore`` are
    skipped.  Refuses, with ``ConfigError`` naming the file: a missing or
    unreadable file, invalid TOML, an unknown key, a value of the wrong type.
    """
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(option, path, "no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(option, path, f"cannot be read ({getattr(error, 'strerror', None) or error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(option, path, f"is not valid TOML ({error})") from None
    owners = {field.name: cls for cls in classes for field in knobs(cls)}
    grouped: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for key, value in data.items():
        name = key.replace("-", "_")
        if key in ignore:
            continue
        if name not in owners:
            raise ConfigError(option, path, f"unknown key {key!r} (valid: {', '.join(sorted(owners))})")
        if value == "none" and field_type(owners[name], name).endswith("| None"):
            value = None  # TOML has no null: "none" stands for it, as on the command line
        try:
            check_type(owners[name], name, value)
        except ConfigError as error:
            raise error.spelled(toml_spelling(path)) from None
        grouped[owners[name]][name] = value
    return grouped


def write_whole(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that no partial file ever stays: written beside it, then renamed over it."""
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".partial", path)


def check_writable_file(option: str, path: str | None, endings: Sequence[str] | None = None) -> None:
    """Refuse, with ``ConfigError`` on ``option``, an output file that cannot be written: an ending not in
    ``endings`` (any when ``None``), a folder in its place, a missing or read-only folder.  ``None``: no file."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    ending = os.path.splitext(path)[1].lstrip(".").lower()
    if endings is not None and ending not in endings:
        raise ConfigError(option, path, f"must end in one of {', '.join('.' + e for e in endings)}")
    if os.path.isdir(path):
        raise ConfigError(option, path, "is a folder; name a file")
    if not os.path.isdir(folder):
        raise ConfigError(option, path, f"the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(option, path, f"the folder {folder} is not writable")
