"""Mixed precision: stages compute in bfloat16 or float16, weights, gradients and optimizer state stay float32.

``precision="bf16"`` or ``"fp16"`` runs every stage's forward (and so its
backward) under ``torch.autocast`` on the pipeline's device; the tensors a
stage passes on are in the compute dtype, so messages are half the size,
while the flat parameter and gradient buffers and the optimizer state stay
float32 (the master weights).  The loss is computed in float32.

float16's narrow range needs *dynamic loss scaling*: the loss is multiplied
by a scale before its backward, the reduced gradients are divided by it
before the step, and a step whose gradients overflowed is skipped — by the
program guard (``skip_nonfinite``), on every rank together — and the scale
halved; after ``growth_interval`` clean steps it doubles.  Every rank sees
the same guard result, so every rank holds the same scale.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..run_options import PRECISIONS

__all__ = ["PRECISIONS", "LossScaler", "compute", "in_float32"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute(precision: str, device: torch.device):
    """Return the context a stage's forward runs in: autocast to the precision's dtype, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def in_float32(value):
    """Return ``value`` (a tensor or a tuple of them) with low-precision floating tensors cast to float32, for the loss."""
    if isinstance(value, tuple):
        return tuple(in_float32(item) for item in value)
    if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
        return value.float()
    return value


@dataclass
class LossScaler:
    """The dynamic loss scale of float16 training: halved on an overflow, doubled after ``growth_interval`` clean steps."""

    scale: float = 2.0**16
    growth_interval: int = 200
    clean_steps: int = 0
    skipped_steps: int = 0

    def after_step(self, skipped: bool) -> None:
        """Update the scale after a step the guard let through (``skipped`` false) or skipped."""
        if skipped:
            self.scale /= 2.0
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def unscale_or_skip(self, shards, skipped: bool) -> None:
        """Finish a guarded step: divide the shards' gradients by the scale when it goes on, then update the scale.

        ``shards`` are the local stages' ``StageShard``; ``skipped``: the guard stopped the step on every rank.
        """
        if not skipped:  # the step goes on with the gradients of the unscaled loss
            for shard in shards:
                for _, gradient in shard.local_gradients():
                    if gradient is not None:
                        gradient.mul_(1.0 / self.scale)
        self.after_step(skipped)
