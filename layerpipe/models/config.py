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


@dataclass(frozen=True)
class LlamaDemoConfig:
    """The demo Llama (``--model llama``): its sizes, or a Hugging Face config file of a covered family instead.

    Its vocabulary is the text's characters and its sequences are ``block_size`` long (the GPT's knob, which both
    text demos read); ``layerpipe.models.llama`` builds it with transformers.
    """

    llama_width: int = knob(
        128, "model width of the Llama (--model llama; its hidden_size)", check=whole(1), metavar="N"
    )
    llama_layers: int = knob(
        4,
        "decoder layers of the Llama (--model llama; it has layers + 2 layers: embedding, decoder layers, norm and head)",
        check=whole(1),
        metavar="N",
    )
    llama_heads: int = knob(4, "attention heads of the Llama (must divide --llama-width)", check=whole(1), metavar="N")
    llama_kv_heads: int = knob(
        2,
        "key-value heads of the Llama (grouped-query attention; must divide --llama-heads)",
        check=whole(1),
        metavar="N",
    )
    llama_mlp_width: int = knob(
        344, "inner width of the Llama's gated MLP (its intermediate_size)", check=whole(1), metavar="N"
    )
    hf_config: str | None = knob(
        None,
        "with --model llama, train the model of this Hugging Face config instead of the Llama the --llama-* options "
        "size: a config.json (or a folder holding one) of a covered family (Llama, Mistral, Qwen2, Qwen3, GPT-2), "
        "read by transformers, nothing downloaded; its vocabulary becomes the text's characters",
        metavar="FILE",
        default_text="none",
    )

    def to_json(self) -> dict:
        """Return the knobs as a JSON-ready dictionary."""
        return asdict(self)
