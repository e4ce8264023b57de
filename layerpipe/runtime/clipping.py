"""Global gradient-norm clipping: the ``CLIP`` action's handler (``clip_grad_norm``).

As ``torch.nn.utils.clip_grad_norm_`` on the whole model in one process:
every process sums the squares of the reduced gradients it counts — each
ZeRO shard once, each data-parallel replica its own shard of the buffer,
the first spatial band only (the bands hold equal gradients) — into one
entry per stage; one all-reduce over every process adds them up, and every
stage's gradients are scaled by ``min(1, max_norm / (norm + 1e-6))``.

The same all-reduce is the guard: an entry that is not finite names the
first stage whose gradients are not finite anywhere, and every rank skips
its step, as ``GUARD`` does (clipping by a norm that is not finite would
write NaN into every weight).  float16: the sums are of the scaled
gradients; the gradients are unscaled first and the norm divided by the
scale (a power of two), then clipped.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..schedule.actions import Action
from .guard import wait_for_reduces
from .layout import Layout
from .p2p import wait_for
from .run_state import COMPUTE, RunState

CLIP_EPSILON = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does."""


def clip(executor, action: Action, state: RunState) -> str:
    """Agree on the global gradient norm with every process, skip the step if it is not finite, else clip.

    Sets ``state.grad_norm`` (the norm before clipping, equal on every
    process) and, when the norm is not finite, ``state.skipped``.
    ``executor`` is the ``Executor`` running the program (this is its handler of ``CLIP``).
    """
    wait_for_reduces(executor, action)
    partial = _partial_squares(executor)
    work = dist.all_reduce(partial, async_op=True)
    wait_for(work, executor.context.timeout, executor.context.rank, f"at {action} summing the squared gradient norm")
    not_finite = torch.nonzero(~torch.isfinite(partial)).flatten().tolist()
    if not_finite:
        state.skipped = not_finite[0]
    shards = [local.shard for local in executor.stages.values()]
    scale = 1.0
    if executor.scaler is not None:
        scale = executor.scaler.scale
        executor.scaler.unscale_or_skip(shards, bool(not_finite))
    state.grad_norm = math.sqrt(float(partial.sum())) / scale
    if not not_finite:
        clip_to(shards, state.grad_norm, executor.context.clip_grad_norm)
    return COMPUTE


def clip_to(shards, norm: float, max_norm: float) -> None:
    """Scale every shard's gradients by ``min(1, max_norm / (norm + 1e-6))`` (nothing to do at 1)."""
    coefficient = max_norm / (norm + CLIP_EPSILON)
    if coefficient < 1.0:
        for shard in shards:
            shard.scale_gradients(coefficient)


def _partial_squares(executor) -> torch.Tensor:
    """Return, per stage, the sum of the squares of the gradients this process counts (float64, zeros elsewhere)."""
    context = executor.context
    partial = torch.zeros(context.placement.stages, dtype=torch.float64, device=context.device)
    if _counts_bands(context):
        for index, local in executor.stages.items():
            partial[index] = local.shard.squared_norm()
    return partial


def _counts_bands(context) -> bool:
    """Return whether this process counts its gradients: the first spatial band does (every band holds them alike)."""
    bands = dist.get_world_size() // (context.placement.ranks * context.replicas)
    return Layout(context.placement.ranks, context.replicas, bands).spatial_index(dist.get_rank()) == 0
