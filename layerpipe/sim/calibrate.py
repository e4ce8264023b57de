"""Calibrate the cost model from a measured timeline, so a run can be simulated beside its measurement."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean, median, pstdev

from ..schedule.actions import BARRIER_KINDS, TIE_KINDS, Kind, Message, message_of
from .cost import CostModel
from .timeline import Timeline

_SENDS = (Kind.SEND_F, Kind.SEND_B)
_NOT_COMPUTE = (
    Kind.STEP.value,
    Kind.GUARD.value,
    Kind.CLIP.value,
    Kind.TIE.value,
)  # one per step, and waits for every process


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
    a ``RECV`` whose message is there holds it for ``receive_time``: the mean
    of the receives that began after their message's send had ended (each
    receive matched to its send by message, in order), which counts the
    times a process sharing its core is descheduled while it takes a message
    in.  ``variation`` is the spread of the compute times (standard
    deviation over mean of each stage's forwards, backwards, recomputes,
    each weighted by its total time), ``hold_variation`` that of the holds.  Transfer latency and bandwidth
    and data-parallel costs stay zero: ``layerpipe calibrate`` measures them apart.  Refuses, with
    ``ValueError``, a timeline without a forward of every stage.
    """
    durations, starts, transfers = _grouped(timeline)
    forward, backward, shares = _compute_times(durations, stages)
    recomputes = [_typical(durations, Kind.R, stage) for stage in range(stages)]
    steps = [t for (kind, _), values in durations.items() if kind == Kind.STEP.value for t in values]
    recompute = (
        None
        if all(time is None for time in recomputes)
        else tuple(time if time is not None else forward[stage] for stage, time in enumerate(recomputes))
    )
    return CostModel(
        forward_time=tuple(forward),
        backward_time=tuple(backward),
        recompute_time=recompute,
        input_gradient_share=median(shares) if shares else 0.5,
        optimizer_time=mean(steps) if steps else 0.0,
        action_overhead=_typical_gap(starts),
        send_time=_mean(_send_holds(transfers)),
        receive_time=_mean(_ready_receives(transfers)),
        variation=_variation(durations),
        hold_variation=_hold_variation(transfers),
    )


def _grouped(timeline: Timeline) -> tuple[dict, dict, dict]:
    """Return the timeline's compute durations by (kind, stage), each rank's compute and point-to-point spans, and
    the point-to-point spans by (is a send, message)."""
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    starts: dict[int, list[tuple[float, float]]] = defaultdict(list)
    transfers: dict[tuple[bool, Message], list[tuple[float, float]]] = defaultdict(list)
    for rank, stream, action, start, end in timeline.events:
        if stream == "p2p":
            transfers[(action.kind in _SENDS, message_of(action))].append((start, end))
        if stream not in ("compute", "p2p"):
            continue
        starts[rank].append((start, end))
        if stream == "compute":
            durations[(action.kind.value, action.stage)].append(end - start)
    return durations, starts, transfers


def _typical(durations: dict, kind: Kind, stage: int) -> float | None:
    """Return the mean duration of ``kind`` on ``stage``, or ``None`` when the timeline has none."""
    found = durations.get((kind.value, stage))
    return mean(found) if found else None


def _compute_times(durations: dict, stages: int) -> tuple[list[float], list[float], list[float]]:
    """Return each stage's forward and backward time (``I`` plus ``W`` without a ``B``) and the input-gradient
    shares of the split ones; refuse, with ``ValueError``, a stage without a forward."""
    forward, backward, shares = [], [], []
    for stage in range(stages):
        f = _typical(durations, Kind.F, stage)
        if f is None:
            raise ValueError(f"the timeline has no forward of stage {stage}: cannot calibrate {stages} stages")
        b = _typical(durations, Kind.B, stage)
        if b is None:
            i, w = _typical(durations, Kind.I, stage) or 0.0, _typical(durations, Kind.W, stage) or 0.0
            b = i + w
            if b:
                shares.append(i / b)
        forward.append(f)
        backward.append(b)
    return forward, backward, shares


def _variation(durations: dict) -> float:
    """Return the compute times' spread: each stage's and kind's standard deviation over mean, weighted by its total
    (optimizer steps, one per step, and GUARD and CLIP waits left out)."""
    return _weighted_spread(found for (kind, _), found in durations.items() if kind not in _NOT_COMPUTE)


def _weighted_spread(groups) -> float:
    """Return the groups' standard deviation over mean, each weighted by its total (a group of fewer than two
    values or a total of 0 left out; 0 with none left)."""
    spread = total = 0.0
    for values in groups:
        if len(values) >= 2 and sum(values):
            spread += pstdev(values) / mean(values) * sum(values)
            total += sum(values)
    return spread / total if total else 0.0


def _mean(values: list[float]) -> float:
    return mean(values) if values else 0.0


def _send_holds(transfers: dict) -> list[float]:
    """Return how long each send held its rank."""
    return [end - start for (is_send, _), spans in transfers.items() if is_send for start, end in spans]


def _ready_receives(transfers: dict) -> list[float]:
    """Return the durations of the receives whose message's send had ended before they began.

    The k-th receive of a message is matched to its k-th send: the timeline
    may hold several steps, each with the same messages.
    """
    ready = []
    for (is_send, message), receives in transfers.items():
        if is_send:
            continue
        sends = sorted(transfers.get((True, message), ()))
        ready += [end - start for (start, end), (_, sent) in zip(sorted(receives), sends) if start >= sent]
    return ready


def _hold_variation(transfers: dict) -> float:
    """Return the holds' spread: the sends' and the ready receives' standard deviation over mean, each weighted by
    its total (a kind with fewer than two holds left out; 0 with neither).  On a machine whose processes share
    cores most holds are short and some last a scheduling slice."""
    return _weighted_spread((_send_holds(transfers), _ready_receives(transfers)))


def _typical_gap(spans: dict[int, list[tuple[float, float]]]) -> float:
    """Return the median over ranks of each rank's median gap between consecutive actions."""
    gaps = []
    for found in spans.values():
        ordered = sorted(found)
        between = [max(0.0, following[0] - previous[1]) for previous, following in zip(ordered, ordered[1:])]
        if between:
            gaps.append(median(between))
    return median(gaps) if gaps else 0.0


def contention(timeline: Timeline, cores: int, replicas: int = 1) -> float:
    """Return how much slower the timeline's compute ran than it would alone, were cores shared fairly: ``≥ 1``.

    At each moment ``n`` ranks of the timeline compute, and as many in each
    of the ``replicas`` (the timeline is one replica's), so each runs at
    ``min(1, cores / (replicas · n))`` of its own speed.  The result is the
    compute time over the work it would take alone.  Refuses, with
    ``ValueError``, fewer than one core or replica.
    """
    if cores < 1 or replicas < 1:
        raise ValueError(f"contention needs at least one core and one replica, not {cores} and {replicas}")
    changes = sorted(
        point
        for _, stream, action, start, end in timeline.events
        if stream == "compute" and end > start and action.kind not in BARRIER_KINDS | TIE_KINDS
        for point in ((start, 1), (end, -1))
    )
    busy = alone = 0.0
    running, previous = 0, None
    for moment, change in changes:
        if running and previous is not None:
            span = (moment - previous) * running
            busy += span
            alone += span * min(1.0, cores / (replicas * running))
        running, previous = running + change, moment
    return busy / alone if alone else 1.0


def gather_latency(
    timeline: Timeline, weight_bytes: tuple[float, ...], replicas: int, bandwidth: float
) -> float | None:
    """Return the latency the timeline's weight gathers show, as ``collective_time`` reads it: the mean, over
    gathers, of the time each took once the collectives issued before it on its rank had ended, less its bytes'
    share over ``bandwidth`` (``None`` without gathers or replicas).

    A collective needs every replica's process on a core, so on a machine
    whose processes share cores it takes longer than on an idle one.
    """
    if replicas <= 1:
        return None
    by_rank: dict[int, list] = defaultdict(list)
    for rank, stream, action, start, end in timeline.events:
        if stream == "data_parallel":
            by_rank[rank].append((start, end, action))
    latencies = []
    for spans in by_rank.values():
        free = 0.0
        for start, end, action in sorted(spans):
            if action.kind is Kind.GATHER:
                moved = (replicas - 1) / replicas * weight_bytes[action.stage] / bandwidth
                latencies.append(end - max(start, free) - moved)
            free = max(free, end)
    return max(0.0, mean(latencies)) if latencies else None
