"""``layerpipe compare``: simulate several schedules on one model, ranks, micro-batches and costs, side by side."""

from __future__ import annotations

import argparse
import json

from ..knobs import ConfigError
from ..options import check_writable_file
from ..schedule.build import build_schedule
from ..schedule.config import SCHEDULES, validate_config
from ..schedule.registry import schedule_record
from ..sim.cost import at_means, draws
from ..sim.same_model import same_model_cost
from ..sim.simulator import simulate
from .common import (
    CALLS_HELP,
    PICTURE_FORMATS,
    add_schedule_and_cost,
    cost_model,
    schedule_config,
    steady,
    title,
    wrote,
)


def add_parser(commands) -> None:
    """Add ``compare`` to the subcommands."""
    parser = commands.add_parser(
        "compare",
        help="simulate several schedules on one configuration",
        description="Simulate several schedules on the same model, ranks, micro-batches and "
        "costs; print a table and optionally one picture stacking their "
        "timelines. Times and sizes are per stage of the looping schedules (V "
        "stages per rank); gpipe and 1f1b hold V times as much per stage.",
    )
    parser.add_argument(
        "--schedules",
        default=None,
        metavar="A,B,...",
        help="schedules to compare (default: all; grouped only with --group-size)",
    )
    add_schedule_and_cost(parser, cost=True, skip=("schedule",))
    parser.add_argument("--calls", type=int, default=1, metavar="N", help=CALLS_HELP)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="write one picture stacking the timelines")
    parser.set_defaults(run=run)


def compared_schedules(args: argparse.Namespace) -> list[str]:
    """Return the schedules ``compare`` runs: those named, or all (grouped only with a group size)."""
    if args.schedules is None:  # every schedule the options allow
        return [name for name in SCHEDULES if _allowed(args, name)]
    names = [name.strip() for name in args.schedules.split(",")]
    for name in names:
        if name not in SCHEDULES:
            raise ConfigError("schedules", args.schedules, f"{name!r} is unknown; choose from {', '.join(SCHEDULES)}")
        if "group_size" in schedule_record(name).options and args.group_size is None:
            raise ConfigError("schedules", args.schedules, f"{name} needs `group_size` too")
    return names


def _allowed(args: argparse.Namespace, name: str) -> bool:
    try:
        validate_config(schedule_config(args, name))
    except ConfigError:
        return False
    return True


def table(rows: list) -> str:
    """Return the table ``compare`` prints: one row per schedule."""
    lines = [
        f"{'schedule':<14} {'v':>2} {'step time':>10} {'bubble':>8} {'steady':>8} {'exposed comm':>13} "
        f"{'peak act.':>10} {'versions':>9} {'gathers':>8} {'reduces':>8}"
    ]
    for name, config, result in rows:
        lines.append(
            f"{name:<14} {config.stages_per_rank:>2} {result.step_time:>10.4g} {result.bubble_fraction:>8.2%} "
            f"{steady(result):>8} {max(r.exposed_communication for r in result.ranks):>13.4g} "
            f"{max(r.peak_activations for r in result.ranks):>10} "
            f"{max(result.weight_versions):>9} {result.gathers:>8} {result.reduces:>8}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """Simulate every compared schedule on the mean costs; print the table (or JSON) and write the plot asked for."""
    names = compared_schedules(args)
    cost = cost_model(args)
    if draws(cost) and not args.json:
        print(
            f"ranked on the mean compute times and holds (the spreads of {cost.variation:.0%} and "
            f"{cost.hold_variation:.0%} are left out: one draw each would be noise)"
        )
    cost = at_means(cost)
    check_writable_file("plot", args.plot, PICTURE_FORMATS)
    reference_stages = schedule_config(args, "breadth-first").stages_per_rank
    rows = []
    for name in names:
        config = schedule_config(args, name)
        schedule = build_schedule(config, calls=args.calls)
        rows.append((name, config, simulate(schedule, same_model_cost(cost, reference_stages, config.stages_per_rank))))
    if args.json:
        print(json.dumps([{"config": config.to_json(), **result.to_json()} for _, config, result in rows]))
    else:
        print(table(rows))
    if args.plot:
        from ..viz.gantt import plot_timelines

        plot_timelines([result.timeline for _, _, result in rows], args.plot, [title(config) for _, config, _ in rows])
        wrote(args.plot)
