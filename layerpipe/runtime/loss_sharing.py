"""Loss sharing: every rank returns the step's mean loss, which only the last stage's rank computes.

The last stage's rank of each replica averages the loss over the replicas
(an all-reduce over the loss group) and sends it point-to-point to the other
ranks of its pipeline; with spatial chunks the chunks' weighted losses are
summed.  On gloo the other ranks post their receive before the program runs,
which costs them nothing, where a broadcast would hold every rank at the end
of the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .context import RankContext
from .layout import Layout
from .p2p import wait_for
from .run_state import RunResult
from .tags import LOSS_TAG


class LossSharing:
    """Shares a run's mean loss from ``loss_rank`` (a global rank) with the ranks of this process's pipeline.

    ``early``: post the receive before the program runs (not on NCCL, which
    runs a pair's operations in issue order).
    """

    def __init__(self, context: RankContext, layout: Layout, groups, global_rank: int, loss_rank: int, early: bool):
        self.context, self.layout, self.groups = context, layout, groups
        self.global_rank, self.loss_rank, self.early = global_rank, loss_rank, early
        self.rank, self.replica = layout.pipeline_rank(global_rank), layout.replica(global_rank)
        self.spatial_index = layout.spatial_index(global_rank)

    def post(self):
        """Post the receive of the run's loss ahead of the program when ``early``; return it (or ``None``)."""
        return self._post_receive() if self.early else None

    def share(self, result: RunResult, posted) -> float:
        """Return the run's mean loss: averaged over the replicas' last-stage ranks, sent point-to-point to the others.

        ``posted`` is what ``post`` returned before the run.
        """
        if self.global_rank == self.loss_rank:
            value = torch.full(
                (1,), result.loss_sum / self.context.microbatches, dtype=torch.float64, device=self.context.device
            )
            if self.groups.loss is not None:
                work = dist.all_reduce(value, group=self.groups.loss, async_op=True)
                wait_for(work, self.context.timeout, self.global_rank, "averaging the step's loss over the replicas")
                value /= self.layout.data_parallel
            self._send(value)
            return self._summed_over_chunks(value)
        buffer, work = posted if posted is not None else self._post_receive()
        wait_for(
            work, self.context.timeout, self.global_rank, f"waiting for the step's loss from rank {self.loss_rank}"
        )
        return self._summed_over_chunks(buffer)

    def _send(self, value: torch.Tensor) -> None:
        """Send the loss to every other rank of this pipeline and wait for the sends."""
        members = self.layout.pipeline_members(self.replica, self.spatial_index)
        works = [
            dist.isend(value, dst=peer, tag=LOSS_TAG, group=self.context.group_of(self.rank, pipeline_rank))
            for pipeline_rank, peer in enumerate(members)
            if peer != self.global_rank
        ]
        for work in works:
            wait_for(work, self.context.timeout, self.global_rank, "sending the step's loss to the other ranks")

    def _post_receive(self):
        """Post the receive of the step's mean loss from the last stage's rank (``None`` on that rank)."""
        if self.global_rank == self.loss_rank:
            return None
        buffer = torch.zeros(1, dtype=torch.float64, device=self.context.device)
        group = self.context.group_of(self.context.placement.loss_rank, self.rank)
        return buffer, dist.irecv(buffer, src=self.loss_rank, tag=LOSS_TAG, group=group)

    def _summed_over_chunks(self, loss: torch.Tensor) -> float:
        """Return the whole images' loss: the sum of the chunks' weighted losses (the loss itself without chunks)."""
        if self.layout.spatial > 1:
            work = dist.all_reduce(loss, group=self.groups.spatial, async_op=True)
            wait_for(work, self.context.timeout, self.global_rank, "summing the step's loss over the spatial chunks")
        return float(loss.item())
