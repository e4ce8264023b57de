"""The process layout: ``world = pipeline × data`` and the process groups it needs.

Global rank ``g`` is pipeline rank ``g // data`` of data-parallel replica
``g % data``: the replicas of one pipeline rank are neighbours, so the
heaviest traffic (gathering and reducing weights and gradients) stays
between adjacent processes, which share a host when a host holds several.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """``pipeline`` ranks per replica times ``data`` replicas."""

    pipeline: int
    data: int

    @property
    def world(self) -> int:
        """Return the number of processes, ``pipeline × data``."""
        return self.pipeline * self.data

    def global_rank(self, pipeline_rank: int, replica: int) -> int:
        """Return the process-group rank of ``pipeline_rank`` in ``replica``."""
        return pipeline_rank * self.data + replica

    def pipeline_rank(self, global_rank: int) -> int:
        """Return the pipeline rank that process ``global_rank`` plays."""
        return global_rank // self.data

    def replica(self, global_rank: int) -> int:
        """Return the data-parallel replica that process ``global_rank`` belongs to."""
        return global_rank % self.data

    def pipeline_members(self, replica: int) -> tuple[int, ...]:
        """Return the global ranks of one replica's pipeline, in pipeline-rank order."""
        return tuple(self.global_rank(r, replica) for r in range(self.pipeline))

    def data_members(self, pipeline_rank: int) -> tuple[int, ...]:
        """Return the global ranks that hold the same stages, in replica order."""
        return tuple(self.global_rank(pipeline_rank, d) for d in range(self.data))

    def describe(self) -> str:
        """Return a small table: one line per pipeline rank listing its process in every replica."""
        header = "pipeline rank │ " + " ".join(f"replica {d:<3}" for d in range(self.data))
        lines = [f"layout: {self.pipeline} pipeline ranks × {self.data} data-parallel replicas "
                 f"= {self.world} processes (global rank = pipeline rank × {self.data} + replica)", header]
        for r in range(self.pipeline):
            lines.append(f"{r:>13} │ " + " ".join(f"{g:<11}" for g in self.data_members(r)))
        return "\n".join(lines)


@dataclass(frozen=True)
class Groups:
    """The process groups of one process: its replica's pipeline, its data-parallel peers, and the loss group.

    ``loss`` joins the last pipeline rank of every replica; the step's loss is
    averaged there, apart from the data-parallel group whose collectives run
    asynchronously in program order.
    """

    pipeline: object
    data: object
    loss: object


def make_groups(layout: Layout, rank: int) -> Groups:
    """Return this process's groups.  Collective: every process creates every group in the same order."""
    if layout.data == 1:
        world = dist.group.WORLD
        return Groups(world, None, None)
    pipelines = [dist.new_group(layout.pipeline_members(d)) for d in range(layout.data)]
    datas = [dist.new_group(layout.data_members(r)) for r in range(layout.pipeline)]
    loss = dist.new_group(layout.data_members(layout.pipeline - 1))
    pipeline_rank = layout.pipeline_rank(rank)
    return Groups(pipelines[layout.replica(rank)], datas[pipeline_rank],
                  loss if pipeline_rank == layout.pipeline - 1 else None)
