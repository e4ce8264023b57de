"""Replicas and modes: every replica of a stage holds replica 0's model, and evaluation runs in evaluation mode.

As ``DistributedDataParallel`` does: at construction replica 0's
parameters and buffers are broadcast to the other replicas of each stage
(and chunk 0's parameters to the other spatial chunks), before the weights
move into their flat and sharded buffers, so ZeRO 0–3 shard equal values.
After each training step, with ``broadcast_buffers`` (the default), replica
0's buffers (BatchNorm's running statistics, its ``num_batches_tracked``)
are broadcast again: what DDP does before the next forward, done at the end
of the step so that evaluation, ``forward`` and checkpoints see one model on
every process without being collective themselves.

``evaluation_mode`` runs ``eval_step`` and ``forward`` with every layer in
evaluation mode and gives each module its own mode back after; ``LocalModel`` is
what the runs ask for all of this, and it warns once when a training step has
no optimizer to update with.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .layout import Layout
from .p2p import wait_for


def broadcast_tensors(tensors: Iterable[torch.Tensor], source: int, group, timeout: float, rank: int, what: str):
    """Overwrite ``tensors`` with process ``source``'s values over ``group``: one broadcast of all their bytes.

    Every member passes tensors of the same shapes and dtypes in the same order.
    """
    tensors = list(tensors)
    if not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([tensor.detach().reshape(-1).view(torch.uint8) for tensor in tensors])
        wait_for(
            dist.broadcast(flat, src=source, group=group, async_op=True),
            timeout,
            rank,
            f"broadcasting {what} from process {source}",
        )
        offset = 0
        for tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            tensor.copy_(flat[offset : offset + size].clone().view(tensor.dtype).view_as(tensor))
            offset += size


def stage_buffers(stages: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Return the buffers of ``stages`` (persistent or not), in stage and module order."""
    return [buffer for stage in stages for buffer in stage.buffers()]


def stage_parameters(stages: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Return the parameters of ``stages`` (trained or frozen), in stage and module order."""
    return [parameter for stage in stages for parameter in stage.parameters()]


def start_replicas_equal(stages: dict, layout: Layout, global_rank: int, groups, timeout: float) -> None:
    """Give every process holding this rank's stages the values of replica 0 (chunk 0): parameters and buffers.

    Collective over the spatial and data-parallel groups; call it before the stages' weights are sharded.
    """
    ordered = [stages[index] for index in sorted(stages)]
    rank, replica = layout.pipeline_rank(global_rank), layout.replica(global_rank)
    if layout.spatial > 1:  # a stage's chunks share its weights; their buffers may belong to their band
        source = layout.spatial_members(rank, replica)[0]
        broadcast_tensors(stage_parameters(ordered), source, groups.spatial, timeout, global_rank, "chunk 0's weights")
    if layout.data_parallel > 1:
        source = layout.data_members(rank, layout.spatial_index(global_rank))[0]
        tensors = stage_parameters(ordered) + stage_buffers(ordered)
        broadcast_tensors(tensors, source, groups.data, timeout, global_rank, "replica 0's parameters and buffers")


class ReplicaBuffers:
    """Broadcasts replica 0's buffers of this process's stages to the other replicas after each training step.

    Does nothing with one replica, without buffers, or when ``enabled`` is false.
    """

    def __init__(self, stages: dict, layout: Layout, global_rank: int, group, timeout: float, enabled: bool):
        self.buffers = stage_buffers(stages[index] for index in sorted(stages))
        self.source = layout.data_members(layout.pipeline_rank(global_rank), layout.spatial_index(global_rank))[0]
        self.group, self.timeout, self.global_rank = group, timeout, global_rank
        self.active = enabled and layout.data_parallel > 1 and bool(self.buffers)

    def broadcast(self) -> None:
        """Overwrite the buffers with replica 0's (collective over the data-parallel group when active)."""
        if self.active:
            broadcast_tensors(self.buffers, self.source, self.group, self.timeout, self.global_rank, "buffers")


@contextmanager
def evaluation_mode(stages: Iterable[nn.Module]) -> Iterator[None]:
    """Run the block with every module of ``stages`` in evaluation mode; give each its own mode back after."""
    stages = list(stages)
    modes = [(module, module.training) for stage in stages for module in stage.modules()]
    for stage in stages:
        stage.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


NO_OPTIMIZER = (
    "train_step without an optimizer: the gradients are left in .grad and no weight changes; "
    "give Pipeline(optimizer=callable(params) -> Optimizer) to train"
)
"""The warning of the first training step of a pipeline that has no optimizer."""


class LocalModel:
    """This process's stages as a run sees them: their mode, their buffers across replicas, whether a step updates."""

    def __init__(self, stages: dict, buffers: ReplicaBuffers, updates: bool):
        self.stages, self.buffers, self.updates = stages, buffers, updates
        self.warned = False

    def evaluating(self):
        """Return a context that runs the stages in evaluation mode and gives each module its mode back after."""
        return evaluation_mode(self.stages[index] for index in sorted(self.stages))

    def before_training(self) -> None:
        """Warn, once, that a step without an optimizer changes no weight."""
        if not self.updates and not self.warned:
            self.warned = True
            warnings.warn(NO_OPTIMIZER, UserWarning, stacklevel=4)

    def after_training(self) -> None:
        """Give the other replicas replica 0's buffers (with ``broadcast_buffers``)."""
        self.buffers.broadcast()
