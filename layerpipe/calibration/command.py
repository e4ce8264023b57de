"""``layerpipe calibrate``: read train's options, run the measurement on local processes, write the cost file.

It takes ``layerpipe train``'s options (the model, the schedule, the
layout) but those about train's output folder, trains a few steps (20
unless ``--steps``) and writes nothing but the cost file, whose ``[about]``
table records the layout ``simulate`` and ``compare`` then default to.
This module imports no torch, so ``--help`` is quick; ``measure`` does the
work on each process.
"""

from __future__ import annotations

import argparse
import sys

from ..knobs import COMMAND_LINE, ConfigError
from ..options import check_writable_file
from ..train.config import build_parser as train_parser
from ..train.config import config_from, replaced

DEFAULT_STEPS = 20
"""Training steps calibrate runs unless ``--steps``."""

NOT_CALIBRATE_OPTIONS = ("output", "checkpoint_every", "keep")
"""Train's options about its output folder, which calibrate does not take: it writes its cost file and nothing else."""


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``layerpipe calibrate``: train's options but ``NOT_CALIBRATE_OPTIONS``, and the cost file."""
    parser = train_parser(skip=NOT_CALIBRATE_OPTIONS)
    parser.prog = "layerpipe calibrate"
    parser.description = (
        "Measure the costs of training the demo with the given options on this machine and layout "
        "(stage times, message and all-reduce latency and bandwidth, bytes per stage, how much "
        "processes sharing cores slow each other) and write them as a cost file for "
        "'layerpipe simulate --cost-file'. Takes the options of 'layerpipe train'; trains "
        f"{DEFAULT_STEPS} steps unless --steps, writing nothing but the cost file."
    )
    parser.add_argument(
        "--cost-file", default="cost.toml", metavar="FILE.toml", help="where to write the costs (default: cost.toml)"
    )
    return parser


def main(argv: list[str]) -> int:
    """Run ``layerpipe calibrate``; return the exit status (2 and one line for bad options)."""
    arguments = build_parser().parse_args(argv)
    try:
        config = config_from(arguments, writes_output=False)
        if "--steps" not in argv:
            config = replaced(config, steps=DEFAULT_STEPS)
        check_writable_file("cost_file", arguments.cost_file)
    except ConfigError as error:
        print(
            f"layerpipe calibrate: error: {error.render(COMMAND_LINE) if error.field == 'cost_file' else error}",
            file=sys.stderr,
        )
        return 2
    from ..runtime.launch import LaunchError, launch
    from .measure import measure

    try:
        figures = launch(measure, config.processes, (config, arguments.cost_file), timeout=config.timeout)[0]
    except LaunchError as error:
        print(f"layerpipe calibrate: failed\n{error}", file=sys.stderr)
        return 1
    print(report(figures, arguments.cost_file))
    return 0


def report(figures: dict, path: str) -> str:
    """Return the lines ``layerpipe calibrate`` prints: what it measured and wrote."""
    cost = figures["cost"]
    forward = ", ".join(f"{1e3 * t:.2f}" for t in cost["forward_time"])
    backward = ", ".join(f"{1e3 * t:.2f}" for t in cost["backward_time"])
    return "\n".join(
        [
            f"forward per stage (ms): {forward}",
            f"backward per stage (ms): {backward}",
            f"message between processes 0 and 1: {1e6 * cost['p2p_latency']:.0f} µs latency, "
            f"{cost['p2p_bandwidth'] / 1e6:,.0f} MB/s",
            f"all-reduce over every process: {1e6 * figures['idle_collective_latency']:.0f} µs latency, "
            f"{cost['data_parallel_bandwidth'] / 1e6:,.0f} MB/s"
            + (
                f"; the run's weight gathers showed {1e6 * cost['data_parallel_latency']:.0f} µs, which the cost file "
                f"keeps"
                if cost["data_parallel_latency"] > figures["idle_collective_latency"]
                else ""
            ),
            f"a forward while every process computes takes {figures['core_sharing']:.2f} times as long as alone; "
            f"over the run, the compute took {figures['contention']:.2f} times as long as alone",
            f"compute times spread by {100 * cost['variation']:.0f} % (standard deviation over mean); a backward "
            f"split in two takes {figures['split_backward']:.2f} times as long as a whole one",
            f"a send holds its process {1e3 * cost['send_time']:.2f} ms, a receive whose message is there "
            f"{1e3 * cost['receive_time']:.2f} ms, on average (spread {100 * cost['hold_variation']:.0f} %)",
            f"step: {1e3 * figures['measured_step']:.1f} ms measured (median of back-to-back steps), "
            f"{1e3 * figures['simulated_step']:.1f} ms simulated with these costs",
            f"wrote {path}: layerpipe simulate --cost-file {path} (on the layout it was measured on, unless told)",
        ]
    )
