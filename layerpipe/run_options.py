"""Run-level knobs: precision, spatial bands, timeout, check_every and broadcast_buffers, with their rules, stated once.

These are facts of a run rather than of its schedule: ``Pipeline`` takes
them as keyword arguments and ``layerpipe train`` as options (and TOML
keys).  Both read their validity from here, so a refusal is the same line
in every spelling, e.g. ``precision='fp16': needs the guard of a flushed
step for its loss scaling, which async has not: use bf16 with async`` in
Python and ``--precision fp16: ...`` on the command line and in TOML.  The rules that
relate a knob to the schedule take what they need of it (``streams``:
whether the schedule is the async stream; ``skip_nonfinite``: whether the
step is guarded), so this module names no schedule.  Nothing here imports
torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .knobs import ConfigError, check_fields, knob, number, one_of

__all__ = [
    "PRECISIONS",
    "RunOptions",
    "check_precision",
    "check_spatial",
    "chunk_rule",
    "seconds_rule",
    "steps_rule",
]

PRECISIONS = ("fp32", "bf16", "fp16")
"""The compute precisions a pipeline may run in (``runtime/precision.py`` runs them)."""

FP16_WITH_ASYNC = "needs the guard of a flushed step for its loss scaling, which async has not: use bf16 with async"
"""Why fp16 is refused on the async stream, whatever else is set."""

FP16_WITHOUT_GUARD = (
    "needs `skip_nonfinite=True`: its loss scaling skips the steps whose gradients overflowed, on every rank together"
)
"""Why fp16 is refused on a flushed schedule without the guard."""

SPATIAL_WITH_ASYNC = "the async stream does not run on spatial chunks yet: use a flushed schedule"
"""Why spatial chunks are refused on the async stream."""


def seconds_rule(value: object) -> str | None:
    """Return what a valid timeout is when ``value`` is not one (a finite number of seconds above 0), else ``None``."""
    if number(0.0, above=True)(value) is not None:
        return "must be a finite number of seconds above 0"
    return None


def chunk_rule(value: object) -> str | None:
    """Return what a valid spatial chunk count is when ``value`` is not one (a whole number, at least 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "must be a whole number of chunks per image, at least 1"
    return None


def steps_rule(value: object) -> str | None:
    """Return what a valid ``check_every`` is when ``value`` is not one (a whole number of steps, 0 for never)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "must be a whole number of steps, 0 for never"
    return None


def check_precision(precision: object, streams: bool, skip_nonfinite: bool) -> None:
    """Refuse, with ``ConfigError`` on ``precision``, fp16 where it cannot run: on the async stream (first,
    whatever else is set), or on a flushed schedule without the guard of ``skip_nonfinite``."""
    if precision == "fp16" and streams:
        raise ConfigError("precision", precision, FP16_WITH_ASYNC)
    if precision == "fp16" and not skip_nonfinite:
        raise ConfigError("precision", precision, FP16_WITHOUT_GUARD)


def check_spatial(spatial: int, streams: bool) -> None:
    """Refuse, with ``ConfigError`` on ``spatial``, spatial chunks on the async stream."""
    if spatial > 1 and streams:
        raise ConfigError("spatial", spatial, SPATIAL_WITH_ASYNC)


@dataclass(frozen=True)
class RunOptions:
    """The run-level knobs ``Pipeline`` takes beside its schedule, each with its rule."""

    precision: str = knob(
        "fp32",
        "compute precision of the stages: fp32, bf16 or fp16 (float32 weights, gradients and "
        "optimizer state; fp16 scales the loss and needs skip_nonfinite)",
        check=one_of(PRECISIONS),
        metavar="NAME",
    )
    spatial: int = knob(
        1, "split every image into this many bands of rows, one per process", check=chunk_rule, metavar="S"
    )
    timeout: float = knob(
        300.0, "seconds any wait may take before it is reported and fails", check=seconds_rule, metavar="SECONDS"
    )
    check_every: int = knob(
        100,
        "every so many training steps (and at the first) compare a checksum of the batch over the processes (0: never)",
        check=steps_rule,
        metavar="N",
    )
    broadcast_buffers: bool = knob(
        True,
        "after every training step give the other data-parallel replicas replica 0's buffers (BatchNorm's "
        "running statistics), as DistributedDataParallel does, so every process evaluates one model",
    )

    def checked(self) -> RunOptions:
        """Return these options if each knob keeps its own rule (in field order), else raise ``ConfigError``."""
        check_fields(self)
        return self

    def check_schedule(self, streams: bool, skip_nonfinite: bool) -> None:
        """Refuse, with ``ConfigError``, options the schedule cannot run with.

        ``streams``: the schedule is the async stream; ``skip_nonfinite``: its step is guarded.
        """
        check_precision(self.precision, streams, skip_nonfinite)
        check_spatial(self.spatial, streams)
