"""The demo GPT's layers counted without building them: parameters, FLOP and stored activations per layer.

The layers are those of ``layerpipe.models.gpt``: an embedding (token and
position), ``blocks`` pre-norm transformer blocks and a head (norm and
linear), so a stage's share follows from the same balanced split the
runtime makes.  Per micro-batch of ``b`` sequences of ``s`` tokens, width
``h``, ``a`` heads and vocabulary ``V``:

* a block's forward multiplies ``24·b·s·h²`` (its four linear layers) plus
  ``4·b·s²·h`` (attention scores and their weighted sum) FLOP; the head's
  ``2·b·s·h·V``;
* a block stores ``s·b·h·(34 + 5·a·s/h)`` bytes for its backward in 16-bit
  precision (Korthikanti et al. 2022, "Reducing Activation Recomputation in
  Large Transformer Models", section 4.1), twice that in 32-bit;
  selective recomputation drops the ``5·a·s/h`` term (the attention
  weights), full recomputation keeps only the block's input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..knobs import knob, whole


@dataclass(frozen=True)
class GPTShape:
    """The sizes of a GPT, the one place they are defined: it has ``blocks + 2`` layers.

    ``layerpipe train``'s ``GPTConfig`` adds its dropout to them; their
    knobs give its options.  ``vocab_size`` is set from the text, not by
    the user, so it is no knob.
    """

    vocab_size: int = 65
    block_size: int = knob(64, "characters per sequence (the context length)", check=whole(1), metavar="N")
    width: int = knob(128, "model width", check=whole(1), metavar="N")
    heads: int = knob(4, "attention heads (must divide width)", check=whole(1), metavar="N")
    blocks: int = knob(
        4, "transformer blocks (the model has blocks + 2 layers: embedding, blocks, head)", check=whole(1), metavar="N"
    )

    @property
    def layers(self) -> int:
        """Return the number of layers: embedding, blocks, head."""
        return self.blocks + 2


SIZES = tuple(field.name for field in fields(GPTShape))
"""The names of a GPT's sizes, as TOML files and a cost file's ``[about]`` table spell them."""


def layer_parameters(shape: GPTShape) -> tuple[int, ...]:
    """Return the parameter count of every layer (as ``gpt_layers`` builds them: biases and norms included)."""
    h, vocabulary = shape.width, shape.vocab_size
    embedding = vocabulary * h + shape.block_size * h
    block = 12 * h * h + 13 * h
    head = 2 * h + h * vocabulary
    return (embedding,) + (block,) * shape.blocks + (head,)


def layer_forward_flops(shape: GPTShape, microbatch_size: int) -> tuple[float, ...]:
    """Return the forward FLOP of every layer for one micro-batch of ``microbatch_size`` sequences."""
    b, s, h = microbatch_size, shape.block_size, shape.width
    block = 24.0 * b * s * h * h + 4.0 * b * s * s * h
    return (float(b * s * h),) + (block,) * shape.blocks + (2.0 * b * s * h * shape.vocab_size,)


def layer_recompute_flops(shape: GPTShape, microbatch_size: int, mode: str) -> tuple[float, ...]:
    """Return the FLOP one recompute of every layer takes in ``mode`` (none, selective: the attention; full)."""
    if mode == "full":
        return layer_forward_flops(shape, microbatch_size)
    if mode == "none":
        return (0.0,) * shape.layers
    b, s, h = microbatch_size, shape.block_size, shape.width
    attention = 4.0 * b * s * s * h + 5.0 * b * shape.heads * s * s
    return (0.0,) + (attention,) * shape.blocks + (0.0,)


def layer_activation_bytes(shape: GPTShape, microbatch_size: int, element_bytes: int, mode: str) -> tuple[float, ...]:
    """Return the bytes every layer stores for its backward per micro-batch when it recomputes in ``mode``.

    ``element_bytes`` is 2 for bf16/fp16 activations and 4 for fp32.  The
    head never recomputes (it computes the loss gradient from its own
    forward); its logits and their softmax take ``b·s·V`` elements each.
    """
    b, s, h, a = microbatch_size, shape.block_size, shape.width, shape.heads
    scale = element_bytes / 2
    block = {
        "none": s * b * h * (34 + 5 * a * s / h) * scale,
        "selective": s * b * h * 34 * scale,
        "full": s * b * h * element_bytes,
    }[mode]
    head = 2.0 * s * b * h * element_bytes + s * b * shape.vocab_size * (element_bytes + 4)
    return (8.0 * b * s,) + (float(block),) * shape.blocks + (head,)


def boundary_bytes(shape: GPTShape, microbatch_size: int, element_bytes: int) -> float:
    """Return the bytes of one micro-batch's activations between two layers (``b·s·h`` elements)."""
    return float(microbatch_size * shape.block_size * shape.width * element_bytes)


def stage_sums(values: tuple[float, ...], boundaries) -> tuple[float, ...]:
    """Return ``values`` (one per layer) summed over each stage's ``(start, end)`` layer range."""
    return tuple(float(sum(values[start:end])) for start, end in boundaries)
