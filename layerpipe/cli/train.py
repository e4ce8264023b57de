"""``layerpipe train``: listed here, parsed and run by ``layerpipe.train`` (its options are ``TrainConfig``'s)."""

from __future__ import annotations


def add_parser(commands) -> None:
    """Add ``train`` to the subcommands (its own parser answers ``--help``)."""
    commands.add_parser(
        "train",
        help="train a small GPT with a pipeline schedule on local processes "
        "(the main job; see 'layerpipe train --help')",
        add_help=False,
    )


def main(argv: list[str]) -> int:
    """Run ``layerpipe train`` with ``argv`` (what follows ``train``); return the exit status."""
    from ..train import main as train_main

    return train_main(argv)
