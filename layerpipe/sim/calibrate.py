"""Calibrate the cost model from a measured timeline, so a run can be simulated beside its measurement."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean, median

from ..schedule.actions import Kind
from .cost import CostModel
from .timeline import Timeline


def calibrated_cost(timeline: Timeline, stages: int) -> CostModel:
    """Return a ``CostModel`` whose per-stage forward and backward times are the timeline's means.

    Means, not medians: a step takes the sum of its actions, slow ones
    included.  ``B`` gives the backward time; with only ``I`` and ``W``
    their sum does, and ``I``'s share of it the ``input_gradient_share``.
    ``R`` gives each recomputed stage's recompute time (the others keep
    their forward's); ``STEP`` gives the optimizer time.  The ``action_overhead`` is the
    typical gap between two consecutive actions of a rank, compute or
    point-to-point (the median gap of each rank, then the median over
    ranks): what the runtime spends between actions.  A ``SEND`` holds its
    rank for as long as it is issued (``send_time``: the mean of the sends);
    a ``RECV`` whose message is there holds it for ``receive_time``, the
    lower quartile of the receives (a quarter of them or more wait for
    nothing).  Transfer latency and bandwidth and data-parallel costs stay
    zero: ``layerpipe calibrate`` measures them apart.  Refuses, with
    ``ValueError``, a timeline without a forward of every stage.
    """
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    starts: dict[int, list[tuple[float, float]]] = defaultdict(list)
    sends, receives = [], []
    for rank, stream, action, start, end in timeline.events:
        if stream == "p2p":
            (sends if action.kind.value.startswith("SEND") else receives).append(end - start)
        if stream not in ("compute", "p2p"):
            continue
        starts[rank].append((start, end))
        if stream == "compute":
            durations[(action.kind.value, action.stage)].append(end - start)

    def typical(kind: Kind, stage: int) -> float | None:
        found = durations.get((kind.value, stage))
        return mean(found) if found else None

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
    recomputes = [typical(Kind.R, stage) for stage in range(stages)]
    steps = [t for (kind, _), values in durations.items() if kind == Kind.STEP.value for t in values]
    recompute = None if all(time is None for time in recomputes) else tuple(
        time if time is not None else forward[stage] for stage, time in enumerate(recomputes))
    return CostModel(forward_time=tuple(forward), backward_time=tuple(backward), recompute_time=recompute,
                     input_gradient_share=median(shares) if shares else 0.5,
                     optimizer_time=mean(steps) if steps else 0.0, action_overhead=_typical_gap(starts),
                     send_time=mean(sends) if sends else 0.0, receive_time=_quartile(receives))


def _quartile(values: list[float]) -> float:
    """Return the lower quartile of ``values`` (0 when empty): a receive that waited for nothing."""
    return sorted(values)[len(values) // 4] if values else 0.0


def _typical_gap(spans: dict[int, list[tuple[float, float]]]) -> float:
    """Return the median over ranks of each rank's median gap between consecutive actions."""
    gaps = []
    for found in spans.values():
        ordered = sorted(found)
        between = [max(0.0, following[0] - previous[1]) for previous, following in zip(ordered, ordered[1:])]
        if between:
            gaps.append(median(between))
    return median(gaps) if gaps else 0.0
