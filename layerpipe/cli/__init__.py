"""The ``layerpipe`` command: one module per subcommand, each with ``add_parser`` and ``run``.

``train`` and ``calibrate`` hand their arguments to their own packages
(``layerpipe.train``, ``layerpipe.calibration``); ``schedule``,
``simulate``, ``compare`` and ``plan`` run here, without torch.  Every
schedule and cost option is generated from the knobs of ``ScheduleConfig``
and ``CostModel``: the same names, help and validity as in Python and in
``layerpipe train``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..knobs import ConfigError
from ..options import Parser
from ..schedule.validation import ScheduleError
from . import calibrate, compare, export, plan, schedule, simulate, train
from .common import spelling_of

COMMANDS = (train, calibrate, schedule, simulate, compare, plan, export)
"""The subcommands' modules, in the order ``layerpipe --help`` lists them."""

__all__ = ["COMMANDS", "build_parser", "main"]

OWN_PARSERS = {"train": train.main, "calibrate": calibrate.main}
"""Subcommands that parse their own arguments (``TrainConfig``'s options)."""

DESCRIPTION = (
    "Pipeline-parallel training. 'train' trains a demo (a small GPT, or 2x super-resolution) on local "
    "processes; 'calibrate' measures its costs into a cost file; 'schedule' prints each rank's program, "
    "'simulate' runs it against a cost model, 'compare' runs several schedules side by side; 'plan' searches the "
    "fastest configuration for N devices; 'export' writes a checkpoint of a Hugging Face model as a folder "
    "transformers loads."
)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``layerpipe`` command."""
    parser = Parser(prog="layerpipe", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"layerpipe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in OWN_PARSERS:
        return OWN_PARSERS[argv[0]](argv[1:])
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
        print(f"layerpipe {args.command}: error: {error.render(spelling_of(error.field, args))}", file=sys.stderr)
        return 2
    except ScheduleError as error:
        print(f"layerpipe {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
