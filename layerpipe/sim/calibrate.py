"""Calibrate the cost model from a measured timeline, so a run can be simulated beside its measurement."""

from __future__ import annotations

from collections import defaultdict
from statistics import median

from ..schedule.actions import Kind
from .cost import CostModel
from .timeline import Timeline


def calibrated_cost(timeline: Timeline, stages: int) -> CostModel:
    """Return a ``CostModel`` whose per-stage forward and backward times are the timeline's medians.

    ``B`` gives the backward time; with only ``I`` and ``W`` their sum does,
    and ``I``'s share of it the ``input_gradient_share``.  ``STEP`` gives the
    optimizer time.  Point-to-point and data-parallel costs stay zero: on one
    machine they are small and a measured send's duration is not its cost.
    Refuses, with ``ValueError``, a timeline without a forward of every stage.
    """
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    for _, stream, action, start, end in timeline.events:
        if stream != "compute":
            continue
        durations[(action.kind.value, action.stage)].append(end - start)

    def typical(kind: Kind, stage: int) -> float | None:
        found = durations.get((kind.value, stage))
        return median(found) if found else None

    forward, backward, shares = [], [], []
    for stage in range(stages):
        f = typical(Kind.F, stage)
        if f is None:
            raise ValueError(f"the timeline has no forward of stage {stage}: cannot calibrate {stages} stages")
        b = typical(Kind.B, stage)
        if b is None:
            i, w = typical(Kind.I, stage) or 0.0, typical(Kind.W, stage) or 0.0
            b = i + w
            if b:
                shares.append(i / b)
        forward.append(f)
        backward.append(b)
    steps = [t for (kind, _), values in durations.items() if kind == Kind.STEP.value for t in values]
    return CostModel(forward_time=tuple(forward), backward_time=tuple(backward),
                     input_gradient_share=median(shares) if shares else 0.5,
                     optimizer_time=median(steps) if steps else 0.0)
