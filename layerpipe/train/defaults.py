"""The warm-up and clipping ``layerpipe train`` uses when the user names neither, chosen from measured loss curves.

``benchmarks/training_defaults.py`` trained the demo GPT with 3 seeds, with
and without warm-up and clipping, for 20, 100 and 1000 steps
(``docs/training.md``): without both, short runs' losses rose above the
untrained model's.  The rule kept is a warm-up of a quarter of the run, at
most ``WARMUP_CAP`` steps, and clipping at a global gradient norm of
``CLIP_GRAD_NORM``.  Python's ``Pipeline`` keeps clipping off by default;
only the command's run gets these.
"""

from __future__ import annotations

from ..schedule.config import ScheduleConfig

WARMUP_CAP = 100
"""The most warm-up steps a run gets by default (a run of 400 steps or more)."""

WARMUP_SHARE = 4
"""A run shorter than ``4 × WARMUP_CAP`` steps warms up for ``steps // WARMUP_SHARE`` of them."""

CLIP_GRAD_NORM = 1.0
"""The global gradient norm ``layerpipe train`` clips to by default."""

WARMUP_TEXT = f"a quarter of --steps, at most {WARMUP_CAP}"
"""How ``--help`` states the default warm-up."""


def default_warmup(steps: int) -> int:
    """Return the warm-up steps of a run of ``steps`` steps when none is given: ``min(100, steps // 4)``."""
    return min(WARMUP_CAP, steps // WARMUP_SHARE)


def default_clip_grad_norm(schedule: ScheduleConfig) -> float | None:
    """Return the clip limit a run of ``schedule`` gets when none is given: ``CLIP_GRAD_NORM``, or ``None`` (off) where
    clipping cannot run (async streams, optimizer steps placed early)."""
    if schedule.streams or schedule.step_placement == "early":
        return None
    return CLIP_GRAD_NORM
