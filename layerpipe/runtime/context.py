"""The rank context: who this process is in its pipeline and how it reaches its peers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedule.placement import Placement


@dataclass(frozen=True)
class RankContext:
    """What every part of a rank's runtime (executor, mailbox, collectives) needs to know about the rank.

    ``rank`` is the pipeline rank; ``peers[r]`` the process-group rank of
    pipeline rank ``r`` of this replica; ``lookahead`` how many messages a
    receive is posted ahead of the ``RECV`` that needs it (0 on NCCL);
    ``replicas`` the data-parallel replicas the step's batch is split over;
    ``update_every`` the sub-minibatches per update of the async stream
    (``None``: one update per step, after all ``microbatches``);
    ``tag_offset`` where the pipeline's message tags start (``tags.claim_message_tags``);
    ``precision`` the stages' compute precision (``precision.PRECISIONS``);
    ``downward`` the process group of messages to a lower pipeline rank
    (``None``: every message on the default group); ``clip_grad_norm`` the
    limit a ``CLIP`` scales the gradients' global norm down to.
    """

    rank: int
    placement: Placement
    microbatches: int
    peers: tuple[int, ...]
    device: torch.device
    timeout: float
    lookahead: int = 1
    replicas: int = 1
    update_every: int | None = None
    tag_offset: int = 0
    precision: str = "fp32"
    downward: object = None
    clip_grad_norm: float | None = None

    def group_of(self, sender: int, receiver: int):
        """Return the process group of a message from pipeline rank ``sender`` to ``receiver`` (``None``: the
        default group)."""
        return self.downward if receiver < sender else None

    @property
    def microbatches_per_update(self) -> int:
        """Return how many micro-batches' gradients one update sums (the loss is scaled by its inverse)."""
        return self.update_every or self.microbatches

    @property
    def tag_window(self) -> int:
        """Return how many micro-batch numbers message tags tell apart (they repeat beyond, numbered modulo).

        One step's micro-batches; in an async stream, the micro-batches of
        two calls and those in flight into them, the most that can be unreceived at once.
        """
        if self.update_every is None:
            return self.microbatches
        return 2 * (self.microbatches + self.placement.stages)

    @property
    def last_stage(self) -> int:
        """Return the index of the last stage (the one that computes the loss)."""
        return self.placement.stages - 1

    def owns(self, stage: int) -> bool:
        """Return whether this rank holds ``stage``."""
        return self.placement.stage_ranks[stage] == self.rank
