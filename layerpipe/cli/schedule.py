"""``layerpipe schedule``: print each rank's program, one line per rank."""

from __future__ import annotations

import argparse

from ..schedule.actions import format_program, kinds_help
from ..schedule.build import build_schedule
from .common import add_schedule_and_cost, schedule_config


def add_parser(commands) -> None:
    """Add ``schedule`` to the subcommands."""
    parser = commands.add_parser(
        "schedule",
        help="print each rank's program, one line per rank",
        description=f"Print each rank's program: 'rank 0: 0F0 0F1 ...'. Actions: {kinds_help()}.",
    )
    add_schedule_and_cost(parser, cost=False)
    parser.add_argument(
        "--lowered",
        action="store_true",
        help="print the lowered program (with communication, "
        "gathers, reduces, recomputes and optimizer steps) instead of the compute order",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Print the compute order (or, with ``--lowered``, the lowered program) of every rank."""
    schedule = build_schedule(schedule_config(args))
    for rank, program in enumerate(schedule.programs if args.lowered else schedule.compute):
        print(f"rank {rank}: {format_program(program)}")
