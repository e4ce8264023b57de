"""The ``layerpipe`` command: print schedules, simulate them, compare them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Sequence

from .knobs import COMMAND_LINE
from .schedule.actions import format_program
from .schedule.build import build_schedule
from .schedule.config import SCHEDULES, ConfigError, ScheduleConfig
from .schedule.validation import ScheduleError
from .sim.cost import CostModel
from .sim.simulator import SimResult, simulate


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, without the usage block."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def _whole(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value
    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be zero or more")
    return value


def _schedule_options(parser: argparse.ArgumentParser, default_schedule: str | None = "breadth-first") -> None:
    group = parser.add_argument_group("schedule")
    if default_schedule is not None:
        group.add_argument("--schedule", default=default_schedule, choices=SCHEDULES, metavar="NAME",
                           help=f"one of {', '.join(SCHEDULES)} (default: %(default)s)")
    group.add_argument("--ranks", "-p", type=_whole(1), default=4, metavar="P", help="pipeline ranks (default: %(default)s)")
    group.add_argument("--stages-per-rank", "-v", type=_whole(1), default=None, metavar="V",
                       help="stages on each rank, placed looping: stage s on rank s %% P "
                            "(default: 2 for looping schedules, 1 for gpipe and 1f1b)")
    group.add_argument("--microbatches", "-m", type=_whole(1), default=8, metavar="M",
                       help="micro-batches per step (default: %(default)s)")
    group.add_argument("--group-size", "-n", type=_whole(1), default=None, metavar="N",
                       help="grouped only: micro-batches per stage before switching, P <= N <= M "
                            "(N = P is interleaved, N = M breadth-first)")
    group.add_argument("--placement", default="auto", choices=("auto", "contiguous", "looping", "vshape"),
                       help="stage placement; vshape puts stages r and 2P-1-r on rank r (breadth-first, V = 2)")
    group.add_argument("--dp", type=_whole(1), default=1, metavar="D", help="data-parallel replicas (default: 1)")
    group.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                       help="sharding level with --dp: 0 replicated, 1 optimizer state, 2 + gradients, 3 + weights")
    group.add_argument("--reduce-portions", type=_whole(1), default=1, metavar="K",
                       help="split each stage's gradient reduce into K portions issued lowest stage first")
    group.add_argument("--reduce-order", default="priority", choices=("priority", "bucketed"),
                       help="priority: portions interleaved so the earliest layers complete first; bucketed: a "
                            "stage's portions together as it finishes, like DDP's buckets (default: priority)")
    group.add_argument("--weight-buffers", type=_whole(1), default=None, metavar="K",
                       help="ZeRO-3: gathered stage weight buffers a rank may hold at once (default: all its stages)")
    group.add_argument("--recompute", default="none", metavar="MODE",
                       help="activation recomputation: none, full or selective for every stage but the last, "
                            "or one mode per stage, comma-separated")


def _cost_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cost model (times in any unit, sizes in bytes)")
    group.add_argument("--forward-time", type=_non_negative, default=1.0, help="forward of one micro-batch through one stage (default: 1)")
    group.add_argument("--backward-time", type=_non_negative, default=2.0, help="full backward of one micro-batch through one stage (default: 2)")
    group.add_argument("--input-gradient-share", type=_non_negative, default=0.5,
                       help="share of the backward time spent on the input gradient I (zero-bubble; default: 0.5)")
    group.add_argument("--recompute-time", type=_non_negative, default=None, help="one recompute (default: the forward time)")
    group.add_argument("--optimizer-time", type=_non_negative, default=0.0, help="optimizer step of one stage (default: 0)")
    group.add_argument("--p2p-time", type=_non_negative, default=0.0, help="latency of one point-to-point transfer (default: 0)")
    group.add_argument("--p2p-bandwidth", type=_non_negative, default=math.inf, help="bytes per time unit between pipeline ranks")
    group.add_argument("--boundary-bytes", type=_non_negative, default=0.0, help="bytes of a stage's output for one micro-batch")
    group.add_argument("--activation-bytes", type=_non_negative, default=0.0, help="bytes a stage stores per micro-batch for backward")
    group.add_argument("--weight-bytes", type=_non_negative, default=0.0, help="bytes of one stage's weights (and gradients)")
    group.add_argument("--dp-bandwidth", type=_non_negative, default=math.inf, help="bytes per time unit of the data-parallel link")
    group.add_argument("--dp-latency", type=_non_negative, default=0.0, help="latency of one data-parallel collective")
    group.add_argument("--no-overlap", action="store_true", help="communication blocks compute instead of running on its own stream")


def config_from_args(args: argparse.Namespace, schedule: str | None = None) -> ScheduleConfig:
    """Return the schedule configuration the parsed options describe.

    With ``schedule`` given (``compare``), gpipe and 1f1b use one stage per
    rank whatever ``--stages-per-rank`` says, since they cannot use more.
    """
    name = schedule or args.schedule
    stages_per_rank = args.stages_per_rank
    if stages_per_rank is None or (schedule is not None and name in ("gpipe", "1f1b")):
        stages_per_rank = 1 if name in ("gpipe", "1f1b") else (stages_per_rank or 2)
    return ScheduleConfig(
        schedule=name, ranks=args.ranks, microbatches=args.microbatches, stages_per_rank=stages_per_rank,
        group_size=args.group_size, placement=args.placement, data_parallel=args.dp, zero=args.zero,
        reduce_portions=args.reduce_portions, reduce_order=args.reduce_order, weight_buffers=args.weight_buffers,
        recompute=args.recompute,
    )


def cost_from_args(args: argparse.Namespace) -> CostModel:
    """Return the cost model the parsed options describe."""
    return CostModel(
        forward_time=args.forward_time, backward_time=args.backward_time,
        input_gradient_share=args.input_gradient_share, recompute_time=args.recompute_time,
        optimizer_time=args.optimizer_time, p2p_latency=args.p2p_time, p2p_bandwidth=args.p2p_bandwidth,
        boundary_bytes=args.boundary_bytes, activation_bytes=args.activation_bytes, weight_bytes=args.weight_bytes,
        dp_latency=args.dp_latency, dp_bandwidth=args.dp_bandwidth, overlap=not args.no_overlap,
    )


def _summary(result: SimResult) -> str:
    lines = [
        f"step time {result.step_time:.4g}   ideal {result.ideal_time:.4g}   bubble {result.bubble_fraction:.2%}   "
        f"gathers {result.gathers}   reduces {result.reduces}",
        f"{'rank':>4} {'busy':>10} {'idle':>10} {'exposed comm':>13} {'peak activations':>17}",
    ]
    for rank in result.ranks:
        lines.append(f"{rank.rank:>4} {rank.busy:>10.4g} {rank.idle:>10.4g} {rank.exposed_communication:>13.4g} {rank.peak_activations:>17}")
    return "\n".join(lines)


def _command_schedule(args: argparse.Namespace) -> None:
    schedule = build_schedule(config_from_args(args))
    for rank, program in enumerate(schedule.programs if args.lowered else schedule.compute):
        print(f"rank {rank}: {format_program(program)}")


def _command_simulate(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    cost = cost_from_args(args)
    result = simulate(build_schedule(config), cost)
    if args.plot:
        from .viz.gantt import plot_timeline
        plot_timeline(result.timeline, args.plot, _title(config))
    if args.trace:
        from .viz.chrome_trace import write_chrome_trace
        write_chrome_trace(result.timeline, args.trace)
    if args.json:
        print(json.dumps({"config": config.to_json(), **result.to_json()}))
    else:
        print(_title(config))
        print(_summary(result))


def _title(config: ScheduleConfig) -> str:
    text = f"{config.schedule}: p={config.ranks} v={config.stages_per_rank} m={config.microbatches}"
    if config.group_size is not None:
        text += f" N={config.group_size}"
    if config.data_parallel > 1:
        text += f" dp={config.data_parallel} zero={config.zero}"
    return text


def _same_model_cost(cost: CostModel, reference_stages: int, stages_per_rank: int) -> CostModel:
    """Return ``cost`` for a schedule with ``stages_per_rank`` stages running the same model.

    Cost options describe one stage of a rank holding ``reference_stages``
    stages; a stage of a rank holding fewer stages holds more layers.
    """
    scale = reference_stages / stages_per_rank
    if scale == 1:
        return cost
    recompute = None if cost.recompute_time is None else cost.recompute_time * scale
    return dataclasses.replace(cost, forward_time=cost.forward_time * scale, backward_time=cost.backward_time * scale,
                               recompute_time=recompute, activation_bytes=cost.activation_bytes * scale,
                               weight_bytes=cost.weight_bytes * scale)


def _command_compare(args: argparse.Namespace) -> None:
    names = args.schedules.split(",") if args.schedules else list(SCHEDULES)
    cost = cost_from_args(args)
    reference_stages = args.stages_per_rank or 2
    rows, timelines, titles = [], [], []
    for name in names:
        if name not in SCHEDULES:
            raise ConfigError(f"--schedules {name}: unknown; choose from {', '.join(SCHEDULES)}")
        if name == "grouped" and args.group_size is None:
            continue
        config = config_from_args(args, name)
        if name != "grouped":
            config = ScheduleConfig(**{**config.__dict__, "group_size": None})
        result = simulate(build_schedule(config), _same_model_cost(cost, reference_stages, config.stages_per_rank))
        rows.append((name, config, result))
        timelines.append(result.timeline)
        titles.append(_title(config))
    if args.json:
        print(json.dumps([{"config": config.to_json(), **result.to_json()} for _, config, result in rows]))
    else:
        print(f"{'schedule':<14} {'v':>2} {'step time':>10} {'bubble':>8} {'exposed comm':>13} {'peak act.':>10} {'gathers':>8} {'reduces':>8}")
        for name, config, result in rows:
            print(f"{name:<14} {config.stages_per_rank:>2} {result.step_time:>10.4g} {result.bubble_fraction:>8.2%} "
                  f"{max(r.exposed_communication for r in result.ranks):>13.4g} "
                  f"{max(r.peak_activations for r in result.ranks):>10} {result.gathers:>8} {result.reduces:>8}")
    if args.plot:
        from .viz.gantt import plot_timelines
        plot_timelines(timelines, args.plot, titles)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``layerpipe`` command."""
    parser = _Parser(prog="layerpipe", description=(
        "Pipeline-parallel training. 'train' trains a small GPT on local processes; 'schedule' prints each rank's program, "
        "'simulate' runs it against a cost model, 'compare' runs several schedules side by side."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.add_parser("train", help="train a small GPT with a pipeline schedule on local processes "
                        "(the main job; see 'layerpipe train --help')", add_help=False)

    schedule = commands.add_parser("schedule", help="print each rank's program, one line per rank",
                                   description="Print each rank's program: 'rank 0: 0F0 0F1 ...'. "
                                               "Actions: F forward, B backward, I/W its input/weight halves, "
                                               "R recompute, SEND/RECV, GATHER, REDUCE, STEP.")
    _schedule_options(schedule)
    schedule.add_argument("--lowered", action="store_true", help="print the lowered program (with communication, "
                          "gathers, reduces, recomputes and optimizer steps) instead of the compute order")
    schedule.set_defaults(run=_command_schedule)

    sim = commands.add_parser("simulate", help="simulate one step and report step time, bubble, communication, memory",
                              description="Run the lowered programs against a cost model and report step time, "
                                          "bubble fraction, exposed communication and peak activations per rank.")
    _schedule_options(sim)
    _cost_options(sim)
    sim.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sim.add_argument("--plot", metavar="FILE.png", help="write a Gantt chart of the simulated timeline")
    sim.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (open in ui.perfetto.dev)")
    sim.set_defaults(run=_command_simulate)

    compare = commands.add_parser("compare", help="simulate several schedules on one configuration",
                                  description="Simulate several schedules on the same model, ranks, micro-batches and "
                                              "costs; print a table and optionally one picture stacking their timelines. "
                                              "Times and sizes are per stage of the looping schedules (V stages per "
                                              "rank); gpipe and 1f1b hold V times as much per stage.")
    compare.add_argument("--schedules", default=None, metavar="A,B,...",
                         help="schedules to compare (default: all; grouped only with --group-size)")
    _schedule_options(compare, default_schedule=None)
    _cost_options(compare)
    compare.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    compare.add_argument("--plot", metavar="FILE.png", help="write one picture stacking the timelines")
    compare.set_defaults(run=_command_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.run(args)
    except ConfigError as error:
        print(f"layerpipe: error: {error.render(COMMAND_LINE)}", file=sys.stderr)
        return 2
    except ScheduleError as error:
        print(f"layerpipe: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
