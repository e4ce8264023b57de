"""What the commands share: the schedule and cost options, the configurations they describe, and how lines read."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..knobs import COMMAND_LINE, Spelling, knobs, toml_spelling
from ..options import add_knobs, given
from ..schedule.config import ONE_STAGE_SCHEDULES, ScheduleConfig
from ..schedule.registry import schedule_record
from ..sim.cost import CostModel
from ..sim.cost_file import LAYOUT, measured_layout, read_cost_file, with_options
from ..sim.simulator import SimResult

PICTURE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg")
"""File endings ``--plot`` writes (matplotlib's raster and vector formats)."""

CALLS_HELP = (
    "consecutive train_step calls to simulate: flushed schedules repeat their step, async streams "
    "N×M sub-minibatches without draining between calls (default: 1)"
)

COST_FILE_HELP = (
    "start from the costs of this file (as 'layerpipe calibrate' writes them) and the layout they were "
    "measured on (ranks, stages per rank, micro-batches, data-parallel replicas, ZeRO level); the options "
    "below win over it"
)


def file_layout(args: argparse.Namespace) -> dict[str, Any]:
    """Return the layout the ``--cost-file`` was measured on (nothing without one); refuse a bad file first."""
    path = getattr(args, "cost_file", None)
    if not path:
        return {}
    read_cost_file(path)
    return measured_layout(path)


def schedule_config(args: argparse.Namespace, schedule: str | None = None) -> ScheduleConfig:
    """Return the schedule configuration the parsed options describe, on the cost file's layout where not given.

    With ``schedule`` given (``compare``), gpipe and 1f1b use one stage per
    rank whatever ``--stages-per-rank`` says, since they cannot use more,
    and only grouped takes ``--group-size``.
    """
    values = {**file_layout(args), **given(args, ScheduleConfig)}
    if schedule is not None:
        values["schedule"] = schedule
        if schedule in ONE_STAGE_SCHEDULES:
            values.pop("stages_per_rank", None)
        if "group_size" not in schedule_record(schedule).options:
            values.pop("group_size", None)
    return ScheduleConfig(**values)


def cost_model(args: argparse.Namespace) -> CostModel:
    """Return the cost model the parsed options describe: the ``--cost-file``'s, with the cost options given on the
    command line put in (``simulate`` refuses their bad values; ``read_cost_file`` the file's)."""
    base = read_cost_file(args.cost_file) if getattr(args, "cost_file", None) else CostModel()
    return with_options(base, given(args, CostModel))


def spelling_of(field: str, args: argparse.Namespace) -> Spelling:
    """Return how to name ``field`` in an error: as the cost file's key when its value came from that file."""
    cost_file = getattr(args, "cost_file", None)
    if not cost_file or getattr(args, field, None) is not None:  # no file, or given on the command line
        return COMMAND_LINE
    if field in {f.name for f in knobs(CostModel)} or (field in LAYOUT and field in file_layout(args)):
        return toml_spelling(cost_file)
    return COMMAND_LINE


def add_schedule_and_cost(parser: argparse.ArgumentParser, cost: bool, skip: Sequence[str] = ()) -> None:
    """Add the schedule options (all but ``skip``) and, with ``cost``, the cost file and the cost options."""
    add_knobs(parser.add_argument_group("schedule (ScheduleConfig)"), ScheduleConfig(), skip=skip)
    if cost:
        group = parser.add_argument_group("cost model (CostModel; times in any unit, sizes in bytes)")
        group.add_argument("--cost-file", metavar="FILE.toml", help=COST_FILE_HELP)
        add_knobs(group, CostModel())


def wrote(path: str) -> None:
    """Say on stderr that ``path`` was written (stdout stays the table or the JSON)."""
    print(f"wrote {path}", file=sys.stderr)


def steady(result: SimResult) -> str:
    """Return the steady-state bubble as a percentage, or ``-`` when the run has no steady state."""
    return "-" if result.steady_bubble is None else f"{result.steady_bubble:.2%}"


def title(config: ScheduleConfig) -> str:
    """Return the one-line title of a configuration: schedule, ranks, stages per rank, micro-batches and more."""
    text = f"{config.schedule}: p={config.ranks} v={config.stages_per_rank} m={config.microbatches}"
    if config.group_size is not None:
        text += f" N={config.group_size}"
    if config.data_parallel > 1:
        text += f" data_parallel={config.data_parallel} zero={config.zero}"
    return text
