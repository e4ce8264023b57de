"""Message tags: the one place that says which tag a point-to-point message uses, in ranges that cannot collide.

Three kinds of point-to-point traffic share a pipeline's process group:

* the **loss** of a step, sent from the loss rank to the others (one tag);
* the **agreement** of boundary shapes on the first step: per stage a header
  and its tensors;
* the program's **messages** (``SEND_*``/``RECV_*``), one tag per tensor of a
  message, numbered by ``Message.number``, from the first tag of the
  pipeline's own part of the range (``claim_message_tags``): an async
  pipeline leaves sends pending between calls, and another pipeline on the
  same processes running in between must not take them for its own.

Each gets its own range; the ranges are checked disjoint when this module is
imported, and a message that would run past its range — a stage passing more
tensors than a message has slots, or more stages × micro-batches than the
range holds — is refused instead of reusing another message's tags.
"""

from __future__ import annotations

import itertools

from ..schedule.actions import Message
from .stage import PipelineError

TENSOR_SLOTS = 64
"""Tensors one message (one stage boundary) may carry."""

AGREE_SLOTS = 256
"""Tags per stage while agreeing shapes: the header and up to ``AGREE_SLOTS - 1`` tensors."""

MAX_AGREE_STAGES = 1 << 14

LOSS_TAG = 0
_AGREE = range(1, 1 + MAX_AGREE_STAGES * AGREE_SLOTS)
_MESSAGES = range(_AGREE.stop, (1 << 31) - 1)  # gloo takes tags as 32-bit signed integers

RANGES = {"loss": range(LOSS_TAG, LOSS_TAG + 1), "agreement": _AGREE, "messages": _MESSAGES}
"""Every tag range by traffic kind."""


def _disjoint(ranges) -> bool:
    spans = sorted((r.start, r.stop) for r in ranges)
    return all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:]))


assert _disjoint(RANGES.values()), f"tag ranges overlap: {RANGES}"


def check_capacity(stages: int, microbatches: int) -> None:
    """Refuse, with ``PipelineError``, a pipeline whose messages would need more tags than their range holds."""
    needed = 2 * stages * microbatches * TENSOR_SLOTS
    if needed > len(_MESSAGES):
        raise PipelineError(
            f"{stages} stages × {microbatches} micro-batches need {needed:,} message tags; "
            f"at most {len(_MESSAGES):,} exist: use fewer micro-batches or stages"
        )
    if stages > MAX_AGREE_STAGES:
        raise PipelineError(f"{stages} stages: at most {MAX_AGREE_STAGES} can agree their shapes")


def check_tensor_count(stage: int, count: int) -> None:
    """Refuse, with ``PipelineError``, a stage output of more tensors than one message can carry."""
    if count > TENSOR_SLOTS:
        raise PipelineError(
            f"stage {stage} passes {count} tensors to the next stage; a message carries at most "
            f"{TENSOR_SLOTS}: concatenate or stack some of them"
        )


_pipelines_made = itertools.count()


def claim_message_tags(stages: int, microbatches: int) -> int:
    """Return the offset of a new pipeline's own message tags within the message range.

    Every process makes its pipelines in the same order (they agree their
    shapes collectively), so the n-th pipeline gets the same offset
    everywhere; pipelines alive at once get disjoint parts until the range
    is used up, after which offsets start over from 0.
    """
    span = 2 * stages * microbatches * TENSOR_SLOTS
    return (next(_pipelines_made) % max(1, len(_MESSAGES) // span)) * span


def message_tag(message: Message, microbatches: int, slot: int, offset: int = 0) -> int:
    """Return the tag of tensor ``slot`` of ``message`` in the pipeline whose tags start at ``offset``."""
    return _MESSAGES.start + offset + message.number(microbatches) * TENSOR_SLOTS + slot


def agree_tag(stage: int, slot: int) -> int:
    """Return the tag of slot ``slot`` (0: the header) of stage ``stage``'s output while agreeing shapes."""
    return _AGREE.start + stage * AGREE_SLOTS + slot
