"""``layerpipe simulate``: run the lowered programs against a cost model; print or draw the timeline."""

from __future__ import annotations

import argparse
import json

from ..options import check_writable_file
from ..schedule.build import build_schedule
from ..sim.cost import draws
from ..sim.simulator import SimResult, simulate
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
    """Add ``simulate`` to the subcommands."""
    parser = commands.add_parser(
        "simulate",
        help="simulate one step and report step time, bubble, communication, memory",
        description="Run the lowered programs against a cost model and report step time, "
        "bubble fraction, exposed communication and peak activations per rank.",
    )
    add_schedule_and_cost(parser, cost=True)
    parser.add_argument("--calls", type=int, default=1, metavar="N", help=CALLS_HELP)
    parser.add_argument(
        "--guard-fails",
        action="store_true",
        help="with --skip-nonfinite: every guard finds a non-finite gradient, and the steps after it are "
        "skipped on every rank (shown on the timeline)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help=f"write a Gantt chart of the simulated timeline ({', '.join(PICTURE_FORMATS)})",
    )
    parser.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (open in ui.perfetto.dev)")
    parser.set_defaults(run=run)


def summary(result: SimResult) -> str:
    """Return the table ``simulate`` prints: the step's figures, then one row per rank."""
    lines = [
        f"step time {result.step_time:.4g}   ideal {result.ideal_time:.4g}   bubble {result.bubble_fraction:.2%}   "
        f"steady-state bubble {steady(result)}   gathers {result.gathers}   reduces {result.reduces}",
        f"{'rank':>4} {'busy':>10} {'idle':>10} {'exposed comm':>13} {'peak activations':>17} {'weight versions':>16}",
    ]
    for rank, versions in zip(result.ranks, result.weight_versions):
        lines.append(
            f"{rank.rank:>4} {rank.busy:>10.4g} {rank.idle:>10.4g} {rank.exposed_communication:>13.4g} "
            f"{rank.peak_activations:>17} {versions:>16}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """Simulate the configured schedule; print the table (or JSON) and write the plot and trace asked for."""
    config, cost = schedule_config(args), cost_model(args)
    check_writable_file("plot", args.plot, PICTURE_FORMATS)
    check_writable_file("trace", args.trace, ("json",))
    result = simulate(build_schedule(config, calls=args.calls), cost, guard_fails=args.guard_fails)
    if args.json:
        print(json.dumps({"config": config.to_json(), "calls": args.calls, **result.to_json()}))
    else:
        print(title(config) + (f", {args.calls} calls (times are for all of them)" if args.calls > 1 else ""))
        print(summary(result))
        if draws(cost):
            print(
                f"compute times and holds drawn around their means with spreads of {cost.variation:.0%} and "
                f"{cost.hold_variation:.0%} (one draw, seed 0; --variation 0 --hold-variation 0 for the means)"
            )
    if args.plot:
        from ..viz.gantt import plot_timeline

        plot_timeline(result.timeline, args.plot, title(config))
        wrote(args.plot)
    if args.trace:
        from ..viz.chrome_trace import write_chrome_trace

        write_chrome_trace(result.timeline, args.trace)
        wrote(args.trace)
