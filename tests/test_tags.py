"""Message tags: disjoint ranges, one tag per tensor of a message, and refusals instead of reused tags."""

from __future__ import annotations

import pytest

from layerpipe.runtime import tags
from layerpipe.runtime.stage import PipelineError
from layerpipe.schedule.actions import Message


def test_the_ranges_are_disjoint():
    spans = sorted((r.start, r.stop) for r in tags.RANGES.values())
    assert all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:]))


def test_every_tensor_of_every_message_of_a_step_has_its_own_tag_inside_the_message_range():
    stages, microbatches = 6, 5
    seen = set()
    for sender in range(stages):
        for backward in (False, True):
            for microbatch in range(microbatches):
                for slot in range(tags.TENSOR_SLOTS):
                    seen.add(tags.message_tag(Message(sender, backward, microbatch), microbatches, slot))
    assert len(seen) == stages * 2 * microbatches * tags.TENSOR_SLOTS
    assert all(tag in tags.RANGES["messages"] for tag in seen)
    assert tags.LOSS_TAG not in seen and not seen & {tags.agree_tag(s, k) for s in range(stages) for k in range(4)}


def test_more_tensors_than_a_message_carries_are_refused():
    tags.check_tensor_count(3, tags.TENSOR_SLOTS)
    with pytest.raises(PipelineError, match=f"stage 3 passes {tags.TENSOR_SLOTS + 1} tensors"):
        tags.check_tensor_count(3, tags.TENSOR_SLOTS + 1)


def test_a_step_with_more_messages_than_tags_is_refused():
    tags.check_capacity(64, 512)
    with pytest.raises(PipelineError, match="message tags"):
        tags.check_capacity(4096, 8192)


def test_pipelines_made_one_after_another_get_disjoint_message_tags():
    stages, window = 4, 8
    span = 2 * stages * window * tags.TENSOR_SLOTS
    offsets = [tags.claim_message_tags(stages, window) for _ in range(3)]
    assert all(offset % span == 0 for offset in offsets) and len(set(offsets)) == 3
    highest = max(
        tags.message_tag(Message(stages - 1, True, window - 1), window, tags.TENSOR_SLOTS - 1, offset)
        for offset in offsets
    )
    assert highest < tags.RANGES["messages"].stop
