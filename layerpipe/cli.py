"""The ``layerpipe`` command: train (``layerpipe train``), print schedules, simulate them, compare them.

Every schedule and cost option is generated from the knobs of
``ScheduleConfig`` and ``CostModel``: the same names, help and validity as
in Python and in ``layerpipe train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from .knobs import COMMAND_LINE, ConfigError, knobs, toml_spelling
from .options import Parser, add_knobs, check_writable_file, given, write_whole
from .schedule.actions import format_program, kinds_help
from .schedule.build import build_schedule
from .schedule.config import ONE_STAGE_SCHEDULES, SCHEDULES, ScheduleConfig, validate_config
from .schedule.validation import ScheduleError
from .sim.cost import CostModel, at_means, draws
from .sim.cost_file import read_cost_file, with_options
from .sim.simulator import SimResult, simulate

PICTURE_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg")
"""File endings ``--plot`` writes (matplotlib's raster and vector formats)."""


def schedule_config(args: argparse.Namespace, schedule: str | None = None) -> ScheduleConfig:
    """Return the schedule configuration the parsed options describe.

    With ``schedule`` given (``compare``), gpipe and 1f1b use one stage per
    rank whatever ``--stages-per-rank`` says, since they cannot use more,
    and only grouped takes ``--group-size``.
    """
    values = given(args, ScheduleConfig)
    if schedule is not None:
        values["schedule"] = schedule
        if schedule in ONE_STAGE_SCHEDULES:
            values.pop("stages_per_rank", None)
        if schedule != "grouped":
            values.pop("group_size", None)
    return ScheduleConfig(**values)


def cost_model(args: argparse.Namespace) -> CostModel:
    """Return the cost model the parsed options describe: the ``--cost-file``'s, with the cost options given on the
    command line put in (``simulate`` refuses their bad values; ``read_cost_file`` the file's)."""
    base = read_cost_file(args.cost_file) if getattr(args, "cost_file", None) else CostModel()
    return with_options(base, given(args, CostModel))


_CALLS_HELP = (
    "consecutive train_step calls to simulate: flushed schedules repeat their step, async streams "
    "N×M sub-minibatches without draining between calls (default: 1)"
)


def _wrote(path: str) -> None:
    print(f"wrote {path}", file=sys.stderr)


def _steady(result: SimResult) -> str:
    return "-" if result.steady_bubble is None else f"{result.steady_bubble:.2%}"


def _summary(result: SimResult) -> str:
    lines = [
        f"step time {result.step_time:.4g}   ideal {result.ideal_time:.4g}   bubble {result.bubble_fraction:.2%}   "
        f"steady-state bubble {_steady(result)}   gathers {result.gathers}   reduces {result.reduces}",
        f"{'rank':>4} {'busy':>10} {'idle':>10} {'exposed comm':>13} {'peak activations':>17} {'weight versions':>16}",
    ]
    for rank, versions in zip(result.ranks, result.weight_versions):
        lines.append(
            f"{rank.rank:>4} {rank.busy:>10.4g} {rank.idle:>10.4g} {rank.exposed_communication:>13.4g} "
            f"{rank.peak_activations:>17} {versions:>16}"
        )
    return "\n".join(lines)


def _command_schedule(args: argparse.Namespace) -> None:
    schedule = build_schedule(schedule_config(args))
    for rank, program in enumerate(schedule.programs if args.lowered else schedule.compute):
        print(f"rank {rank}: {format_program(program)}")


def _command_simulate(args: argparse.Namespace) -> None:
    config, cost = schedule_config(args), cost_model(args)
    check_writable_file("plot", args.plot, PICTURE_FORMATS)
    check_writable_file("trace", args.trace, ("json",))
    result = simulate(build_schedule(config, calls=args.calls), cost, guard_fails=args.guard_fails)
    if args.json:
        print(json.dumps({"config": config.to_json(), "calls": args.calls, **result.to_json()}))
    else:
        print(_title(config) + (f", {args.calls} calls (times are for all of them)" if args.calls > 1 else ""))
        print(_summary(result))
        if draws(cost):
            print(
                f"compute times and holds drawn around their means with spreads of {cost.variation:.0%} and "
                f"{cost.hold_variation:.0%} (one draw, seed 0; --variation 0 --hold-variation 0 for the means)"
            )
    if args.plot:
        from .viz.gantt import plot_timeline

        plot_timeline(result.timeline, args.plot, _title(config))
        _wrote(args.plot)
    if args.trace:
        from .viz.chrome_trace import write_chrome_trace

        write_chrome_trace(result.timeline, args.trace)
        _wrote(args.trace)


def _title(config: ScheduleConfig) -> str:
    text = f"{config.schedule}: p={config.ranks} v={config.stages_per_rank} m={config.microbatches}"
    if config.group_size is not None:
        text += f" N={config.group_size}"
    if config.data_parallel > 1:
        text += f" data_parallel={config.data_parallel} zero={config.zero}"
    return text


def _same_model_cost(cost: CostModel, reference_stages: int, stages_per_rank: int) -> CostModel:
    """Return ``cost`` for a schedule with ``stages_per_rank`` stages running the same model.

    Cost options describe one stage of a rank holding ``reference_stages``
    stages; a stage of a rank holding fewer stages holds more layers.
    """
    scale = reference_stages / stages_per_rank
    if scale == 1:
        return cost
    for name in (
        "forward_time",
        "backward_time",
        "recompute_time",
        "boundary_bytes",
        "activation_bytes",
        "weight_bytes",
    ):
        value = getattr(cost, name)
        if isinstance(value, (tuple, list)):
            raise ConfigError(
                name,
                value,
                "compare runs schedules with different numbers of stages: give one value "
                "(one per stage works with simulate)",
            )
    recompute = None if cost.recompute_time is None else cost.recompute_time * scale
    return dataclasses.replace(
        cost,
        forward_time=cost.forward_time * scale,
        backward_time=cost.backward_time * scale,
        recompute_time=recompute,
        activation_bytes=cost.activation_bytes * scale,
        weight_bytes=cost.weight_bytes * scale,
    )


def _compared_schedules(args: argparse.Namespace) -> list[str]:
    """Return the schedules ``compare`` runs: those named, or all (grouped only with a group size)."""
    if args.schedules is None:  # every schedule the options allow
        return [name for name in SCHEDULES if _allowed(args, name)]
    names = [name.strip() for name in args.schedules.split(",")]
    for name in names:
        if name not in SCHEDULES:
            raise ConfigError("schedules", args.schedules, f"{name!r} is unknown; choose from {', '.join(SCHEDULES)}")
        if name == "grouped" and args.group_size is None:
            raise ConfigError("schedules", args.schedules, "grouped needs `group_size` too")
    return names


def _allowed(args: argparse.Namespace, name: str) -> bool:
    try:
        validate_config(schedule_config(args, name))
    except ConfigError:
        return False
    return True


def _command_compare(args: argparse.Namespace) -> None:
    names = _compared_schedules(args)
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
        result = simulate(
            build_schedule(config, calls=args.calls), _same_model_cost(cost, reference_stages, config.stages_per_rank)
        )
        rows.append((name, config, result))
    if args.json:
        print(json.dumps([{"config": config.to_json(), **result.to_json()} for _, config, result in rows]))
    else:
        print(
            f"{'schedule':<14} {'v':>2} {'step time':>10} {'bubble':>8} {'steady':>8} {'exposed comm':>13} "
            f"{'peak act.':>10} {'versions':>9} {'gathers':>8} {'reduces':>8}"
        )
        for name, config, result in rows:
            print(
                f"{name:<14} {config.stages_per_rank:>2} {result.step_time:>10.4g} {result.bubble_fraction:>8.2%} "
                f"{_steady(result):>8} {max(r.exposed_communication for r in result.ranks):>13.4g} "
                f"{max(r.peak_activations for r in result.ranks):>10} "
                f"{max(result.weight_versions):>9} {result.gathers:>8} {result.reduces:>8}"
            )
    if args.plot:
        from .viz.gantt import plot_timelines

        plot_timelines([result.timeline for _, _, result in rows], args.plot, [_title(config) for _, config, _ in rows])
        _wrote(args.plot)


def _command_plan(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .knobs import check_fields
    from .plan import PlanRequest, describe_shape, plan, table, train_toml

    request = PlanRequest(**given(args, PlanRequest))
    check_fields(request)
    check_writable_file("output", request.output, ("toml",))
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="candidates", unit="", leave=False, disable=None)
        bar.update(done - bar.n)

    try:
        result = plan(request, progress)
    finally:
        if bar is not None:
            bar.close()
    print(
        f"{describe_shape(result.shape)} on "
        f"{request.gpus} devices of {request.gpu_memory:g} GiB on {result.hardware.name}, global batch "
        f"{request.global_batch}: {result.candidates} configurations, {result.simulated} simulated, "
        f"{result.too_big} too big for memory"
    )
    print(table(result))
    write_whole(request.output, train_toml(result.best[0], result, request))
    _wrote(request.output)


def _add_schedule_and_cost(parser: argparse.ArgumentParser, cost: bool, skip: Sequence[str] = ()) -> None:
    add_knobs(parser.add_argument_group("schedule (ScheduleConfig)"), ScheduleConfig(), skip=skip)
    if cost:
        group = parser.add_argument_group("cost model (CostModel; times in any unit, sizes in bytes)")
        group.add_argument(
            "--cost-file",
            metavar="FILE.toml",
            help="start from the costs of this file (as "
            "'layerpipe calibrate' writes them); the cost options below win over it",
        )
        add_knobs(group, CostModel())


def _add_plan_parser(commands) -> None:
    from .plan import PlanRequest

    planner = commands.add_parser(
        "plan",
        help="search the fastest configuration of a GPT on N devices by simulating",
        description="Search pipeline ranks, data-parallel replicas, stages per rank, "
        "micro-batch count and size, group size, ZeRO level, recomputation and "
        "reduce portions for a GPT on --gpus devices; refuse what does not fit "
        "in --gpu-memory, simulate the rest, print the best few and write the "
        "best as a 'layerpipe train --config' file.",
    )
    add_knobs(planner, PlanRequest())
    planner.set_defaults(run=_command_plan)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``layerpipe`` command."""
    parser = Parser(
        prog="layerpipe",
        description=(
            "Pipeline-parallel training. 'train' trains a demo (a small GPT, or 2x super-resolution) on local "
            "processes; 'calibrate' measures its costs into a cost file; 'schedule' prints each rank's program, "
            "'simulate' runs it against a cost model, 'compare' runs several schedules side by side; 'plan' searches the fastest "
            "configuration for N devices."
        ),
    )
    parser.add_argument("--version", action="version", version=f"layerpipe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.add_parser(
        "train",
        help="train a small GPT with a pipeline schedule on local processes "
        "(the main job; see 'layerpipe train --help')",
        add_help=False,
    )
    commands.add_parser(
        "calibrate",
        help="measure the demo's costs on this machine and write a cost file for "
        "simulate --cost-file (see 'layerpipe calibrate --help')",
        add_help=False,
    )

    schedule = commands.add_parser(
        "schedule",
        help="print each rank's program, one line per rank",
        description=f"Print each rank's program: 'rank 0: 0F0 0F1 ...'. Actions: {kinds_help()}.",
    )
    _add_schedule_and_cost(schedule, cost=False)
    schedule.add_argument(
        "--lowered",
        action="store_true",
        help="print the lowered program (with communication, "
        "gathers, reduces, recomputes and optimizer steps) instead of the compute order",
    )
    schedule.set_defaults(run=_command_schedule)

    sim = commands.add_parser(
        "simulate",
        help="simulate one step and report step time, bubble, communication, memory",
        description="Run the lowered programs against a cost model and report step time, "
        "bubble fraction, exposed communication and peak activations per rank.",
    )
    _add_schedule_and_cost(sim, cost=True)
    sim.add_argument("--calls", type=int, default=1, metavar="N", help=_CALLS_HELP)
    sim.add_argument(
        "--guard-fails",
        action="store_true",
        help="with --skip-nonfinite: every guard finds a non-finite gradient, and the steps after it are "
        "skipped on every rank (shown on the timeline)",
    )
    sim.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sim.add_argument(
        "--plot",
        metavar="FILE.png",
        help=f"write a Gantt chart of the simulated timeline ({', '.join(PICTURE_FORMATS)})",
    )
    sim.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (open in ui.perfetto.dev)")
    sim.set_defaults(run=_command_simulate)

    compare = commands.add_parser(
        "compare",
        help="simulate several schedules on one configuration",
        description="Simulate several schedules on the same model, ranks, micro-batches and "
        "costs; print a table and optionally one picture stacking their "
        "timelines. Times and sizes are per stage of the looping schedules (V "
        "stages per rank); gpipe and 1f1b hold V times as much per stage.",
    )
    compare.add_argument(
        "--schedules",
        default=None,
        metavar="A,B,...",
        help="schedules to compare (default: all; grouped only with --group-size)",
    )
    _add_schedule_and_cost(compare, cost=True, skip=("schedule",))
    compare.add_argument("--calls", type=int, default=1, metavar="N", help=_CALLS_HELP)
    compare.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    compare.add_argument("--plot", metavar="FILE.png", help="write one picture stacking the timelines")
    compare.set_defaults(run=_command_compare)

    _add_plan_parser(commands)
    return parser


def _spelling_of(field: str, args: argparse.Namespace):
    """Return how to name ``field`` in an error: as the cost file's key when its value came from that file."""
    cost_file = getattr(args, "cost_file", None)
    if cost_file and field in {f.name for f in knobs(CostModel)} and field not in given(args, CostModel):
        return toml_spelling(cost_file)
    return COMMAND_LINE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["calibrate"]:
        from .train.calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.run(args)
    except BrokenPipeError:  # the reader stopped early (``| head``): not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except ConfigError as error:
        print(f"layerpipe {args.command}: error: {error.render(_spelling_of(error.field, args))}", file=sys.stderr)
        return 2
    except ScheduleError as error:
        print(f"layerpipe {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
