"""The process layout: ``world = pipeline × data_parallel × spatial`` and the process groups it needs.

Global rank ``g`` is spatial index ``g % spatial`` of data-parallel replica
``g // spatial % data_parallel`` of pipeline rank ``g // (spatial · data_parallel)``:
the spatial chunks of one stage are neighbours (they exchange overlap rows
at every convolution), then the replicas of one pipeline rank (gathering and
reducing weights and gradients), so the heaviest traffic stays between
adjacent processes, which share a host when a host holds several.  Every
(replica, spatial index) runs its own copy of the pipeline's programs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """``pipeline`` ranks per replica times ``data_parallel`` replicas times ``spatial`` chunks of every image."""

    pipeline: int
    data_parallel: int
    spatial: int = 1

    @property
    def world(self) -> int:
        """Return the number of processes, ``pipeline × data_parallel × spatial``."""
        return self.pipeline * self.data_parallel * self.spatial

    def global_rank(self, pipeline_rank: int, replica: int, spatial_index: int = 0) -> int:
        """Return the process-group rank of ``pipeline_rank`` in ``replica`` holding chunk ``spatial_index``."""
        return (pipeline_rank * self.data_parallel + replica) * self.spatial + spatial_index

    def pipeline_rank(self, global_rank: int) -> int:
        """Return the pipeline rank that process ``global_rank`` plays."""
        return global_rank // (self.data_parallel * self.spatial)

    def replica(self, global_rank: int) -> int:
        """Return the data-parallel replica that process ``global_rank`` belongs to."""
        return global_rank // self.spatial % self.data_parallel

    def spatial_index(self, global_rank: int) -> int:
        """Return which chunk of every image process ``global_rank`` holds."""
        return global_rank % self.spatial

    def pipeline_members(self, replica: int, spatial_index: int = 0) -> tuple[int, ...]:
        """Return the global ranks of one pipeline (a replica's, for one chunk), in pipeline-rank order."""
        return tuple(self.global_rank(r, replica, spatial_index) for r in range(self.pipeline))

    def data_members(self, pipeline_rank: int, spatial_index: int = 0) -> tuple[int, ...]:
        """Return the global ranks that hold the same stages and chunk, in replica order."""
        return tuple(self.global_rank(pipeline_rank, d, spatial_index) for d in range(self.data_parallel))

    def spatial_members(self, pipeline_rank: int, replica: int) -> tuple[int, ...]:
        """Return the global ranks that hold the chunks of one stage's images, in chunk order."""
        return tuple(self.global_rank(pipeline_rank, replica, i) for i in range(self.spatial))

    def describe(self) -> str:
        """Return a small table: one line per pipeline rank listing its processes in every replica (and chunk)."""
        if self.spatial == 1:
            header = "pipeline rank │ " + " ".join(f"replica {d:<3}" for d in range(self.data_parallel))
            lines = [
                f"layout: {self.pipeline} pipeline ranks × {self.data_parallel} data-parallel replicas "
                f"= {self.world} processes (global rank = pipeline rank × {self.data_parallel} + replica)",
                header,
            ]
            for r in range(self.pipeline):
                lines.append(f"{r:>13} │ " + " ".join(f"{g:<11}" for g in self.data_members(r)))
            return "\n".join(lines)
        lines = [
            f"layout: {self.pipeline} pipeline ranks × {self.data_parallel} data-parallel replicas × "
            f"{self.spatial} spatial chunks = {self.world} processes (process = (pipeline rank × "
            f"{self.data_parallel} + replica) × {self.spatial} + chunk; chunk i holds the i-th band of rows of "
            f"every image, top to bottom)",
            "pipeline rank │ "
            + " ".join(f"replica {d}: processes of chunks 0..{self.spatial - 1}" for d in range(self.data_parallel)),
        ]
        for r in range(self.pipeline):
            lines.append(
                f"{r:>13} │ "
                + " ".join(f"{' '.join(map(str, self.spatial_members(r, d))):<31}" for d in range(self.data_parallel))
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Groups:
    """The process groups of one process: its pipeline, its data-parallel peers, the loss group and its chunks.

    ``loss`` joins the last stage's pipeline rank of every replica (for one
    chunk); the step's loss is averaged there, apart from the data-parallel
    group whose collectives run asynchronously in program order.
    ``spatial`` joins the processes holding the chunks of this process's
    stages' images (``None`` without spatial layers).  ``downward`` joins
    the pipeline's processes again, for the messages that go to a lower
    pipeline rank (gloo; ``None`` on NCCL): a gloo pair with a receive
    posted holds back the sends on it by milliseconds while the sender
    computes, so each pair of each group carries messages one way only.
    """

    pipeline: object
    data: object
    loss: object
    spatial: object = None
    downward: object = None


def make_groups(layout: Layout, rank: int, loss_pipeline_rank: int, spatial_layers: bool = False) -> Groups:
    """Return this process's groups.  Collective: every process creates every group in the same order.

    ``loss_pipeline_rank`` is the pipeline rank of the last stage (the
    placement's ``loss_rank``): its replicas average the step's loss.
    ``spatial_layers``: the model has spatial layers, which get a group even
    of one process.
    """
    one_way = dist.get_backend() == "gloo"
    if layout.data_parallel == 1 and layout.spatial == 1 and not spatial_layers:
        return Groups(
            dist.group.WORLD, None, None, downward=dist.new_group(layout.pipeline_members(0, 0)) if one_way else None
        )
    chunks = range(layout.spatial)
    pipelines = {
        (d, i): dist.new_group(layout.pipeline_members(d, i)) for d in range(layout.data_parallel) for i in chunks
    }
    downwards = (
        {(d, i): dist.new_group(layout.pipeline_members(d, i)) for d in range(layout.data_parallel) for i in chunks}
        if one_way
        else {}
    )
    datas = (
        {(r, i): dist.new_group(layout.data_members(r, i)) for r in range(layout.pipeline) for i in chunks}
        if layout.data_parallel > 1
        else {}
    )
    losses = (
        {i: dist.new_group(layout.data_members(loss_pipeline_rank, i)) for i in chunks}
        if layout.data_parallel > 1
        else {}
    )
    spatials = (
        {
            (r, d): dist.new_group(layout.spatial_members(r, d))
            for r in range(layout.pipeline)
            for d in range(layout.data_parallel)
        }
        if spatial_layers
        else {}
    )
    pipeline_rank, replica, index = layout.pipeline_rank(rank), layout.replica(rank), layout.spatial_index(rank)
    return Groups(
        pipelines[replica, index],
        datas.get((pipeline_rank, index)),
        losses.get(index) if pipeline_rank == loss_pipeline_rank else None,
        spatials.get((pipeline_rank, replica)),
        downwards.get((replica, index)),
    )


def release_groups(groups: Groups, others) -> None:
    """Destroy this process's groups of ``groups`` and ``others`` (never the world's), once every process is here.

    Collective over the world: the barrier first, so that no peer still reads a message on a group being closed
    (gloo would report its connection closed).  Every gloo group keeps threads of its own until destroyed.
    """
    dist.barrier()
    mine = [groups.pipeline, groups.data, groups.loss, groups.spatial, groups.downward, *others]
    for group in {id(group): group for group in mine if group is not None}.values():
        if group is not dist.group.WORLD and group is not dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)
