"""The guard: before a step, every process agrees whether it goes on; not when a gradient is not finite anywhere.

The ``GUARD`` action's handler (``skip_nonfinite``).  It finishes the
float16 loss scaling too: the gradients are unscaled when the step goes on,
and the scale is updated either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..schedule.actions import Action, Kind
from .p2p import wait_for
from .run_state import COMPUTE, RunState


def guard(executor, action: Action, state: RunState) -> str:
    """Agree with every process whether the step goes on: not when a reduced gradient is not finite anywhere.

    Waits for the local stages' reduces, checks the gradients each step
    would use, and all-reduces the first stage with a non-finite one
    (the minimum over every process; one number).  When there is one,
    ``state.skipped`` names it and the run stops after this action, on
    every rank alike.  ``executor`` is the ``Executor`` running the program (this is its handler of ``GUARD``).
    """
    wait_for_reduces(executor, action)
    bad = [index for index, local in sorted(executor.stages.items()) if not local.shard.gradients_finite()]
    first = torch.tensor([float(bad[0]) if bad else float("inf")], dtype=torch.float64, device=executor.context.device)
    work = dist.all_reduce(first, op=dist.ReduceOp.MIN, async_op=True)
    wait_for(
        work, executor.context.timeout, executor.context.rank, f"at {action} agreeing whether every gradient is finite"
    )
    if first.item() != float("inf"):
        state.skipped = int(first.item())
    if executor.scaler is not None:
        executor.scaler.unscale_or_skip([local.shard for local in executor.stages.values()], state.skipped is not None)
    return COMPUTE


def wait_for_reduces(executor, action: Action) -> None:
    """Wait, at ``action``, for the reduces of the rank's local stages still in flight."""
    for index in sorted(executor.stages):
        if (index, Kind.REDUCE) in executor.collectives.pending:
            executor.collectives.wait(index, Kind.REDUCE, action)
