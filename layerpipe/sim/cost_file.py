"""Cost files: a ``CostModel`` measured on one machine and layout, as TOML (no pickle), for the simulator.

``layerpipe calibrate`` writes one; ``layerpipe simulate --cost-file`` and
``compare --cost-file`` read it, with any cost option given on the command
line winning.  The keys are ``CostModel``'s knobs; an ``[about]`` table says
where, when and on what layout the figures were measured (``LAYOUT``), and
``simulate`` and ``compare`` take that layout for the options not given.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from typing import Any

from ..knobs import ConfigError, check_fields, knobs, toml_spelling
from ..options import read_toml, write_whole
from .cost import CostModel

LAYOUT = ("ranks", "stages_per_rank", "microbatches", "data_parallel", "zero")
"""The ``ScheduleConfig`` knobs of the layout a cost file was measured on, recorded in its ``[about]`` table."""


def toml_value(value: Any) -> str:
    """Return ``value`` (a bool, number, string or list of them) written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def cost_file_text(cost: CostModel, about: dict[str, Any]) -> str:
    """Return the TOML text of ``cost`` and its ``[about]`` table (strings, numbers, lists of them)."""
    lines = [
        f"{field.name} = {toml_value(getattr(cost, field.name))}"
        for field in knobs(CostModel)
        if getattr(cost, field.name) is not None
    ]
    lines += ["", "[about]"] + [f"{key} = {toml_value(value)}" for key, value in about.items()]
    return "\n".join(lines) + "\n"


def write_cost_file(path: str, cost: CostModel, about: dict[str, Any]) -> None:
    """Write ``cost`` to ``path`` as TOML (a partial file never stays: it is written beside, then renamed)."""
    write_whole(path, cost_file_text(cost, about))


def read_cost_file(path: str, option: str = "cost_file") -> CostModel:
    """Return the ``CostModel`` of the cost file ``path``.

    Refuses, with ``ConfigError`` naming the file (and the key): a missing or
    unreadable file, invalid TOML, an unknown key, a value of the wrong type
    or out of range (a negative time, a bandwidth of zero).
    """
    values = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in read_toml(path, [CostModel], option, ignore=("about",))[CostModel].items()
    }
    try:
        cost = CostModel(**values)
        check_fields(cost)
    except ConfigError as error:
        raise error.spelled(toml_spelling(path)) from None
    return cost


def with_options(cost: CostModel, options: dict[str, Any]) -> CostModel:
    """Return ``cost`` with the cost options given on the command line put in."""
    return dataclasses.replace(cost, **options)


def measured_layout(path: str) -> dict[str, Any]:
    """Return the layout the cost file ``path`` was measured on (the ``LAYOUT`` keys its ``[about]`` table has).

    Read after ``read_cost_file``, which refuses a file that cannot be read.
    """
    with open(path, "rb") as handle:
        about = tomllib.load(handle).get("about", {})
    return {key: about[key] for key in LAYOUT if key in about} if isinstance(about, dict) else {}
