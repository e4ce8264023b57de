"""The process layout: ``world = pipeline × data_parallel`` and the process groups it needs.

Global rank ``g`` is pipeline rank ``g // data_parallel`` of data-parallel replica
``g % data_parallel``: the replicas of one pipeline rank are neighbours, so the
heaviest traffic (gathering and reducing weights and gradients) stays
between adjacent processes, which share a host when a host holds several.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """``pipeline`` ranks per replica times ``data_parallel`` replicas."""

    pipeline: int
    data_parallel: int

    @property
    def world(self) -> int:
        """Return the number of processes, ``pipeline × data_parallel``."""
        return self.pipeline * self.data_parallel

    def global_rank(self, pipeline_rank: int, replica: int) -> int:
        """Return the process-group rank of ``pipeline_rank`` in ``replica``."""
        return pipeline_rank * self.data_parallel + replica

    def pipeline_rank(self, global_rank: int) -> int:
        """Return the pipeline rank that process ``global_rank`` plays."""
        return global_rank // self.data_parallel

    def replica(self, global_rank: int) -> int:
        """Return the data-parallel replica that process ``global_rank`` belongs to."""
        return global_rank % self.data_parallel

    def pipeline_members(self, replica: int) -> tuple[int, ...]:
        """Return the global ranks of one replica's pipeline, in pipeline-rank order."""
        return tuple(self.global_rank(r, replica) for r in range(self.pipeline))

    def data_members(self, pipeline_rank: int) -> tuple[int, ...]:
        """Return the global ranks that hold the same stages, in replica order."""
        return tuple(self.global_rank(pipeline_rank, d) for d in range(self.data_parallel))

    def describe(self) -> str:
        """Return a small table: one line per pipeline rank listing its process in every replica."""
        header = "pipeline rank │ " + " ".join(f"replica {d:<3}" for d in range(self.data_parallel))
        lines = [f"layout: {self.pipeline} pipeline ranks × {self.data_parallel} data-parallel replicas "
                 f"= {self.world} processes (global rank = pipeline rank × {self.data_parallel} + replica)", header]
        for r in range(self.pipeline):
            lines.append(f"{r:>13} │ " + " ".join(f"{g:<11}" for g in self.data_members(r)))
        return "\n".join(lines)


@dataclass(frozen=True)
class Groups:
    """The process groups of one process: its replica's pipeline, its data-parallel peers, and the loss group.

    ``loss`` joins the last stage's pipeline rank of every replica; the step's loss is
    averaged there, apart from the data-parallel group whose collectives run
    asynchronously in program order.
    """

    pipeline: object
    data: object
    loss: object


def make_groups(layout: Layout, rank: int, loss_pipeline_rank: int) -> Groups:
    """Return this process's groups.  Collective: every process creates every group in the same order.

    ``loss_pipeline_rank`` is the pipeline rank of the last stage (the
    placement's ``loss_rank``): its replicas average the step's loss.
    """
    if layout.data_parallel == 1:
        world = dist.group.WORLD
        return Groups(world, None, None)
    pipelines = [dist.new_group(layout.pipeline_members(d)) for d in range(layout.data_parallel)]
    datas = [dist.new_group(layout.data_members(r)) for r in range(layout.pipeline)]
    loss = dist.new_group(layout.data_members(loss_pipeline_rank))
    pipeline_rank = layout.pipeline_rank(rank)
    return Groups(pipelines[layout.replica(rank)], datas[pipeline_rank],
                  loss if pipeline_rank == loss_pipeline_rank else None)
