"""The memory model: activations a rank holds, from the order of its program.

Compute on a rank runs in program order, so the activations alive after each
action follow from the program alone: a forward stores the stage's
activations for one micro-batch (only its input if the stage recomputes), a
recompute restores them, and the backward (``B``, or ``W`` when split) frees
them.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from ..schedule.actions import Kind, Program


class ActivationPeak(NamedTuple):
    """Peak micro-batch×stage activations alive at once, and the peak bytes they take."""

    count: int
    bytes: float


def activation_peak(
    program: Program,
    activation_bytes: Sequence[float],
    input_bytes: Sequence[float],
    recompute: frozenset[int] = frozenset(),
) -> ActivationPeak:
    """Return the peak number and bytes of stored activations over ``program``.

    ``activation_bytes[s]`` is what stage ``s`` stores per micro-batch,
    ``input_bytes[s]`` what a recomputed stage keeps instead (its input).
    Refuses nothing: actions other than F, R, B and W do not change memory.
    """
    count = peak_count = 0
    size = peak_size = 0.0
    freeing = Kind.W if any(action.kind is Kind.W for action in program) else Kind.B
    forward, recomputing = Kind.F, Kind.R
    for stage, kind, _, _, _ in program:
        if kind is forward:
            if stage in recompute:
                size += input_bytes[stage]
            else:
                count += 1
                size += activation_bytes[stage]
        elif kind is recomputing:
            count += 1
            size += activation_bytes[stage]
        elif kind is freeing:
            count -= 1
            size -= activation_bytes[stage] + (input_bytes[stage] if stage in recompute else 0.0)
        else:
            continue
        if count > peak_count:
            peak_count = count
        if size > peak_size:
            peak_size = size
    return ActivationPeak(peak_count, peak_size)
