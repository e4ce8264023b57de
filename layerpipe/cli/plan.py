"""``layerpipe plan``: search the fastest configuration of a GPT on N devices by simulating; write it as TOML."""

from __future__ import annotations

import argparse

from ..knobs import check_fields
from ..options import add_knobs, check_writable_file, given, write_whole
from .common import wrote


def add_parser(commands) -> None:
    """Add ``plan`` to the subcommands."""
    from ..plan import PlanRequest

    parser = commands.add_parser(
        "plan",
        help="search the fastest configuration of a GPT on N devices by simulating",
        description="Search pipeline ranks, data-parallel replicas, stages per rank, "
        "micro-batch count and size, group size, ZeRO level, recomputation and "
        "reduce portions for a GPT on --gpus devices; refuse what does not fit "
        "in --gpu-memory, simulate the rest, print the best few and write the "
        "best as a 'layerpipe train --config' file.",
    )
    add_knobs(parser, PlanRequest())
    parser.set_defaults(run=run)


def _progress_bar():
    """Return ``(progress, close)``: a candidates bar that appears on the first report, and its closing."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="candidates", unit="", leave=False, disable=None)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return progress, close


def run(args: argparse.Namespace) -> None:
    """Search, print what was searched and the best few, and write the best as a train TOML file."""
    from ..plan import PlanRequest, describe_shape, plan, table, train_toml

    request = PlanRequest(**given(args, PlanRequest))
    check_fields(request)
    check_writable_file("output", request.output, ("toml",))
    progress, close = _progress_bar()
    try:
        result = plan(request, progress)
    finally:
        close()
    print(
        f"{describe_shape(result.shape)} on "
        f"{request.gpus} devices of {request.gpu_memory:g} GiB on {result.hardware.name}, global batch "
        f"{request.global_batch}: {result.candidates} configurations, {result.simulated} simulated, "
        f"{result.too_big} too big for memory"
    )
    print(table(result))
    write_whole(request.output, train_toml(result.best[0], result, request))
    wrote(request.output)
