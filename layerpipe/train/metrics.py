"""TensorBoard scalars of ``layerpipe train --tensorboard DIR`` (the optional extra ``layerpipe[tensorboard]``).

The process that writes summary.json (global rank 0) writes them, through
``torch.utils.tensorboard``: every step's loss, learning rate, step time and
items per second under ``train/``, and the held-out loss under ``eval/`` when
it is measured.  TensorBoard's step N is the N-th training step (as loss.png
counts them and ``checkpoints/step-N`` names them).  Every writer starts by
marking a (re)start at its first step, so a resumed run's curves go on from
its checkpoint and TensorBoard drops what a killed run wrote past it; the
writer is flushed before every checkpoint, so nothing before one is lost.

This module imports no torch: the configuration checks the knob with it.
"""

from __future__ import annotations

import importlib.util
import os

EXTRA = "layerpipe[tensorboard]"
"""The optional extra that installs tensorboard."""


def tensorboard_folder(value: str | None) -> str | None:
    """The rule of the ``tensorboard`` knob: off (``None``), or a folder that can be made, with tensorboard installed."""
    if value is None:
        return None
    if importlib.util.find_spec("tensorboard") is None:
        return f"needs the tensorboard package: install the extra with pip install '{EXTRA}'"
    if os.path.exists(value) and not os.path.isdir(value):
        return "is a file; name a folder (it is created if missing)"
    existing = os.path.abspath(value)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot be made: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written ({existing} is not writable)"
    return None


def step_scalars(history: dict[str, list], items_per_step: int, unit: str) -> dict[str, float]:
    """Return the scalars of the latest step of ``history`` (the run's per-step lists), by TensorBoard tag.

    The global gradient norm is there when clipping measured it.
    """
    step_time = history["step_times"][-1]
    scalars = {
        "train/loss": history["losses"][-1],
        "train/learning_rate": history["learning_rates"][-1],
        "train/step_time": step_time,
        f"train/{unit}_per_second": items_per_step / step_time,
    }
    if len(history["grad_norms"]) == len(history["losses"]):  # with clipping, which measures the norm
        scalars["train/grad_norm"] = history["grad_norms"][-1]
    return scalars


class MetricsWriter:
    """Scalars written to a TensorBoard folder, from the step ``first_step`` on (1 for a fresh run)."""

    def __init__(self, folder: str, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step marks a restart at first_step: what an earlier run wrote from there on is dropped.
        self._writer = SummaryWriter(folder, purge_step=first_step)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Write every scalar of ``scalars`` (by tag) at ``step``."""
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        """Write what is buffered to disk (before a checkpoint: the curves up to it survive a kill)."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class NoMetrics:
    """What a process that writes no scalars holds: every call does nothing."""

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Do nothing."""

    def flush(self) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def open_metrics(folder: str | None, first_step: int, writes: bool) -> MetricsWriter | NoMetrics:
    """Return the writer of ``folder`` on the process that ``writes`` (rank 0), else one that does nothing."""
    return MetricsWriter(folder, first_step) if folder is not None and writes else NoMetrics()
