"""Batches: a global batch checked and split into this replica's micro-batches (and this process's bands of rows).

Every process passes the same global batch; replica ``d`` takes its
``d``-th contiguous share, cut into ``microbatches`` equal micro-batches
(or the ``d``-th share of a list of micro-batches, ``microbatch_lists``).
With spatial chunks each process keeps its band of every image's rows, and
its targets' rows that its outputs stand for.  The checks refuse, in one
line, targets of another batch size, a batch that does not split, and
(every ``check_every`` training steps) processes handed different batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..ops.spatial import gather_bounds
from .layout import Layout
from .microbatch_lists import ListedStep, all_tensors, listed_step
from .p2p import wait_for
from .spatial_split import ChunkLoss, gather_rows, rows_of
from .stage import PipelineError, as_tuple

Tensors = torch.Tensor | Sequence[torch.Tensor]


class Batches:
    """Splits global batches for one process of ``layout``; ``chunk_loss`` weighs its band's loss (spatial only);
    ``count_targets`` counts a micro-batch's targets for lists of micro-batches (``microbatch_lists``)."""

    def __init__(
        self,
        microbatches: int,
        layout: Layout,
        global_rank: int,
        spatial_group,
        chunk_loss: ChunkLoss | None,
        check_every: int,
        timeout: float,
        device: torch.device,
        count_targets: Callable | None = None,
    ):
        self.microbatches, self.layout, self.global_rank = microbatches, layout, global_rank
        self.replica, self.spatial_index = layout.replica(global_rank), layout.spatial_index(global_rank)
        self.spatial_group, self.chunk_loss = spatial_group, chunk_loss
        self.check_every, self.timeout, self.device = check_every, timeout, device
        self.training_calls = 0
        self.count_targets = count_targets  # loss_fn.counted_targets, for lists of micro-batches
        self._target_rows: dict[tuple, tuple[int, int, int]] = {}

    def split(self, training: bool, inputs: Tensors, targets: Tensors | None, across_replicas: bool = True):
        """Return the checked batch as ``(input micro-batches, target micro-batches or None)``.

        ``across_replicas``: this replica's share only (inference runs the whole batch on every replica).
        """
        replicas = self.layout.data_parallel if across_replicas else 1
        replica = self.replica if across_replicas else 0
        if targets is not None:
            check_same_batch(inputs, targets)
        if training and self.check_every and self.training_calls % self.check_every == 0:
            self._check_same_batch_everywhere(inputs)
        self.training_calls += training
        uneven = not training
        input_parts = split_batch(inputs, self.microbatches, "inputs", replicas, replica, uneven)
        target_parts = (
            split_batch(targets, self.microbatches, "targets", replicas, replica, uneven)
            if targets is not None
            else None
        )
        return input_parts, target_parts

    def listed(self, training: bool, inputs: list, targets: list | None) -> ListedStep:
        """Return this replica's part of a list of micro-batches (``microbatch_lists``), checked as ``split`` checks.

        Refuses lists with spatial chunks, whose bands are cut from one batch shape, with ``ValueError``.
        """
        if self.layout.spatial > 1:
            raise ValueError(
                f"inputs: a list of micro-batches, but spatial={self.layout.spatial} cuts bands from one batch: "
                f"give one batch tensor (or spatial=1)"
            )
        step = listed_step(
            inputs, targets, self.microbatches, self.layout.data_parallel, self.replica, self.count_targets
        )
        if training and self.check_every and self.training_calls % self.check_every == 0:
            self._check_same_batch_everywhere(all_tensors(step.everyone))
        self.training_calls += training
        return step

    def bands(self, input_parts: list) -> list:
        """Return this process's band of rows of every micro-batch (the micro-batches themselves without chunks)."""
        if self.layout.spatial == 1:
            return input_parts
        return [rows_of(part, self.layout.spatial, self.spatial_index) for part in input_parts]

    def target_bands(self, signature: tuple, metas: tuple, target_parts: list | None) -> list | None:
        """Return the targets' rows that this chunk's last-stage outputs stand for; weight its loss by their share."""
        if self.layout.spatial == 1 or target_parts is None:
            return target_parts
        rows = self._target_rows.get(signature)
        if rows is None:
            bounds = gather_bounds(metas[-1][0].shape[-2], self.spatial_group)
            rows = self._target_rows[signature] = (*bounds[self.spatial_index], bounds[-1][1])
        first, end, total = rows
        for target in target_parts[0]:
            if target.dim() < 3 or target.shape[-2] != total:
                raise ValueError(
                    f"targets: with spatial={self.layout.spatial} every target must be images whose "
                    f"rows match the output's {total} (second-to-last dimension); a micro-batch's "
                    f"target has shape {tuple(target.shape)}"
                )
        self.chunk_loss.weight = (end - first) / total
        return [tuple(t[..., first:end, :] for t in part) for part in target_parts]

    def joined(self, outputs: tuple):
        """Return the micro-batches' outputs as the whole batch's (whole images, from every chunk's rows)."""
        joined = tuple(torch.cat(parts) for parts in zip(*outputs))
        if self.layout.spatial > 1:
            joined = tuple(gather_rows(t, self.spatial_group) if t.dim() >= 3 else t for t in joined)
        return joined[0] if len(joined) == 1 else joined

    def _check_same_batch_everywhere(self, inputs: Tensors) -> None:
        """Refuse, with ``PipelineError``, processes handed different global batches (a checksum, all-reduced)."""
        if dist.get_world_size() == 1:
            return
        total = sum(
            float(t.detach().double().sum()) + float(t.numel())
            for t in as_tuple(inputs if isinstance(inputs, torch.Tensor) else tuple(inputs))
        )
        found = torch.tensor([total, -total], dtype=torch.float64, device=self.device)
        work = dist.all_reduce(found, op=dist.ReduceOp.MAX, async_op=True)
        wait_for(work, self.timeout, self.global_rank, "comparing the batch's checksum with the other processes")
        if found[0] != -found[1]:
            raise PipelineError(
                f"process {self.global_rank}: the processes were handed different batches "
                f"(input checksums from {-float(found[1]):.6g} to {float(found[0]):.6g}); every "
                f"process must pass the same global batch to train_step"
            )


def check_same_batch(inputs: Tensors, targets: Tensors) -> None:
    """Refuse, with ``ValueError`` naming ``targets``, targets whose batch size differs from the inputs'."""
    first_input = as_tuple(inputs if isinstance(inputs, torch.Tensor) else tuple(inputs))[0]
    for target in as_tuple(targets if isinstance(targets, torch.Tensor) else tuple(targets)):
        if target.dim() == 0 or first_input.dim() == 0 or target.shape[0] != first_input.shape[0]:
            raise ValueError(
                f"targets: a batch of {target.shape[0] if target.dim() else 0} samples, but the inputs "
                f"have {first_input.shape[0] if first_input.dim() else 0}: give one target per sample"
            )


def split_batch(
    batch: Tensors, microbatches: int, name: str, replicas: int = 1, replica: int = 0, uneven: bool = False
) -> list[tuple[torch.Tensor, ...]]:
    """Return replica ``replica``'s contiguous share of the batch as ``microbatches`` micro-batches.

    Equal ones for training; with ``uneven`` (evaluation) the last may differ
    from the others (``microbatch_sizes``), and the replicas' shares must be equal.
    """
    tensors = as_tuple(batch if isinstance(batch, torch.Tensor) else tuple(batch))
    size = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
    parts = microbatches * replicas
    if size == 0 or any(t.shape[0] != size for t in tensors) or size % (replicas if uneven else parts):
        raise ValueError(_unsplittable(name, size, microbatches, replicas, uneven))
    share = size // replicas
    if share < microbatches:
        raise ValueError(f"{name} batch of {size} samples: fewer than one sample per micro-batch ({parts})")
    tensors = tuple(t[replica * share : (replica + 1) * share] for t in tensors)
    sizes = microbatch_sizes(share, microbatches)
    return list(zip(*(t.split(sizes) for t in tensors)))


def microbatch_sizes(samples: int, microbatches: int) -> list[int]:
    """Return the sizes of ``microbatches`` micro-batches of ``samples``: all equal but the last.

    The others hold ``ceil(samples / microbatches)`` when that leaves the
    last at least one sample (359 in 4: 90, 90, 90, 89), else the floor (5 in 4: 1, 1, 1, 2).
    """
    size = -(-samples // microbatches)
    if samples - size * (microbatches - 1) < 1:
        size = samples // microbatches
    return [size] * (microbatches - 1) + [samples - size * (microbatches - 1)]


def _unsplittable(name: str, size: int, microbatches: int, replicas: int, uneven: bool) -> str:
    """Return why a batch of ``size`` samples does not split (training needs equal micro-batches)."""
    if uneven:
        return (
            f"{name} batch of {size} samples: must split into data_parallel={replicas} equal shares "
            f"(a multiple of {replicas} along the first dimension)"
        )
    parts = microbatches * replicas
    across = f"data_parallel={replicas} × " if replicas > 1 else ""
    return (
        f"{name} batch of {size} samples: must split into {across}microbatches={microbatches} "
        f"equal micro-batches (a multiple of {parts} along the first dimension)"
    )
