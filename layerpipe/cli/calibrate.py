"""``layerpipe calibrate``: listed here, parsed and run by ``layerpipe.calibration`` (train's options, a cost file)."""

from __future__ import annotations


def add_parser(commands) -> None:
    """Add ``calibrate`` to the subcommands (its own parser answers ``--help``)."""
    commands.add_parser(
        "calibrate",
        help="measure the demo's costs on this machine and write a cost file for "
        "simulate --cost-file (see 'layerpipe calibrate --help')",
        add_help=False,
    )


def main(argv: list[str]) -> int:
    """Run ``layerpipe calibrate`` with ``argv`` (what follows ``calibrate``); return the exit status."""
    from ..calibration.command import main as calibrate_main

    return calibrate_main(argv)
