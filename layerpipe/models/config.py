"""Sizes of the demo models, the GPT and the super-resolution network, as knobs (no torch import, so ``layerpipe train --help`` stays quick)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..knobs import knob, number, whole
from ..sim.gpt_costs import GPTShape


@dataclass(frozen=True)
class GPTConfig(GPTShape):
    """The demo GPT: its sizes (``GPTShape``'s: vocabulary, context length, width, heads and blocks), its dropout
    and the length buckets of its training micro-batches.

    ``vocab_size`` is set from the text, not by the user, so it is no knob.
    """

    dropout: float = knob(
        0.0,
        "dropout probability",
        check=lambda value: number(0.0)(value) or ("must be below 1" if value >= 1 else None),
        metavar="P",
    )
    tie_embeddings: bool = knob(
        False,
        "tie the head's weight to the token embedding (one parameter, as GPT-2's): the pipeline keeps a copy on "
        "the first and the last stage and sums their gradients once per step (a TIE; flushed schedules only)",
    )
    length_buckets: int = knob(
        0,
        "micro-batches of different lengths: each draws its sequence length from N buckets up to block_size, "
        "with rows for about the same tokens (0: every sequence block_size long)",
        check=whole(0),
        metavar="N",
    )

    def to_json(self) -> dict:
        """Return the sizes as a JSON-ready dictionary."""
        return asdict(self)


@dataclass(frozen=True)
class SuperResConfig:
    """Sizes of the super-resolution network and its training crops."""

    channels: int = knob(
        32, "feature channels of the super-resolution network (--model superres)", check=whole(1), metavar="N"
    )
    crop: int = knob(
        48,
        "side of the high-resolution training crops in pixels, a multiple of 4 (--model superres)",
        check=lambda value: whole(4)(value) or (None if value % 4 == 0 else "must be a multiple of 4"),
        metavar="PIXELS",
    )

    def to_json(self) -> dict:
        """Return the sizes as a JSON-ready dictionary."""
        return asdict(self)
