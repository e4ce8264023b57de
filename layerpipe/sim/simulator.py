"""The simulator: runs lowered programs against a cost model and returns a timeline and metrics.

The programs run by the walk the simulator shares with validation
(``schedule/walk.py``, which states the semantics the executor follows too);
the simulator gives it the cost model's times:

* a compute action (F, B, I, W, R, STEP) takes its stage's time; a ``SEND``
  holds the rank for ``send_time``, then its transfer takes latency plus
  size over bandwidth; a ``RECV`` holds its rank for ``receive_time`` once
  the transfer has arrived; ``GATHER`` and ``REDUCE`` take their ring
  collective's time; a ``GUARD`` takes ``p2p_latency`` once every rank has
  reached it, a ``CLIP`` that and ``clip_time`` per stage of the busiest rank;
  a ``TIE`` an all-reduce of ``tie_bytes`` over its tie group's ranks once they
  have all reached it (nothing when one rank holds the group);
* with a ``variation`` above 0, each compute action's time is drawn from a
  gamma distribution with the cost model's time as its mean (seeded); with a
  ``hold_variation`` above 0, so is each hold of a ``SEND`` or ``RECV``.

Exposed communication is the time a rank's compute waits on a transfer or
collective after its data was ready to go — waiting for a peer's compute is
bubble, not communication.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, field
from functools import cached_property

from ..knobs import check_fields
from ..schedule.actions import BACKWARD_KINDS, PAIR, Kind
from ..schedule.build import Schedule, build_schedule
from ..schedule.bulk import collector_paused
from ..schedule.config import ScheduleConfig
from ..schedule.walk import Walk, WalkCosts, check_finished, message_bases, walk
from .cost import NEGLIGIBLE_SPREAD, CostModel, collective_time, draws, per_stage
from .memory import activation_peak, weight_versions
from .timeline import Timeline


@dataclass(frozen=True)
class RankMetrics:
    """What one rank did in the step."""

    rank: int
    busy: float
    idle: float
    exposed_communication: float
    peak_activations: int
    peak_activation_bytes: float


@dataclass(frozen=True)
class SimResult:
    """Timeline and metrics of one simulated step.

    ``bubble_fraction`` is ``1 - (total compute busy time) / (p × step_time)``;
    ``steady_bubble`` the same over the steady state only: from the moment
    every rank has started backwards to the moment the first rank has ended
    its forwards (``None`` when the programs have no such window, as GPipe's);
    ``weight_versions`` per rank what stashing weights would cost; both are
    computed when first asked;
    ``ideal_time`` is the busiest rank's compute time; ``gathers`` and
    ``reduces`` count the collectives of one pipeline replica (a reduce split
    into portions counts once; ``reduce_portions`` counts the parts).
    """

    timeline: Timeline
    step_time: float
    ideal_time: float
    bubble_fraction: float
    ranks: tuple[RankMetrics, ...]
    gathers: int
    reduces: int
    reduce_portions: int
    programs: tuple = field(default=(), repr=False, compare=False)

    @cached_property
    def steady_bubble(self) -> float | None:
        """Return the bubble of the steady state (computed when first asked: it reads every event)."""
        return steady_bubble(self.timeline.events, self.timeline.ranks)

    @cached_property
    def weight_versions(self) -> tuple[int, ...]:
        """Return, per rank, the most versions of one of its stages' weights that stashing needs at once."""
        return tuple(max(weight_versions(program).values(), default=1) for program in self.programs)

    def to_json(self) -> dict:
        """Return the metrics as a JSON-ready dictionary (without the timeline)."""
        return {
            "step_time": self.step_time,
            "ideal_time": self.ideal_time,
            "bubble_fraction": self.bubble_fraction,
            "steady_bubble": self.steady_bubble,
            "weight_versions": list(self.weight_versions),
            "exposed_communication": max((rank.exposed_communication for rank in self.ranks), default=0.0),
            "ranks": [rank.__dict__ for rank in self.ranks],
            "collectives": {"gather": self.gathers, "reduce": self.reduces, "reduce_portions": self.reduce_portions},
        }


def simulate(schedule: Schedule, cost: CostModel = CostModel(), guard_fails: bool = False, seed: int = 0) -> SimResult:
    """Return the simulated timeline and metrics of one step of ``schedule``.

    ``seed`` seeds the draws of the compute times and holds when ``cost.variation`` or ``cost.hold_variation`` is
    above 0.

    ``guard_fails``: every ``GUARD`` finds a non-finite gradient, so every
    rank skips the steps (and gathers) that follow it; the timeline shows
    them on a ``skipped`` stream, at the moment they would have started.

    Refuses, with ``ConfigError`` naming the field, a cost model with a bad
    value (a bandwidth of 0, an infinite time, a per-stage list of the wrong
    length); raises ``ScheduleError`` naming each blocked rank if the
    programs deadlock.
    """
    check_fields(cost)
    with collector_paused():
        run = walk(schedule.programs, _costs_of(schedule, cost, seed), cost.overlap, guard_fails)
        check_finished(schedule.programs, run.positions, schedule.placement)
        return _result(schedule, cost, run)


_STEADY_CALLS, _STEADY_SEEDS, _REPLICA_GROUPS = 10, 8, 16
"""With drawn times: the extra steps each steady estimate averages, the estimates, and the groups of replicas drawn."""


def steady_step(config: ScheduleConfig, cost: CostModel = CostModel()) -> float:
    """Return what one more step adds when consecutive steps of ``config`` are simulated: the step a training loop
    runs at, once each step may start while the previous one ends.

    With a ``variation`` or ``hold_variation`` above 0 the times are drawn: the result is the mean,
    over several seeds, of what ten more steps add, divided by ten; and with
    data-parallel replicas, which meet at each step's collectives, it adds
    how much longer the slowest of ``data_parallel`` independently drawn
    steps is than the mean step.  Refuses what ``build_schedule`` and
    ``simulate`` refuse."""
    if not draws(cost):
        two, three = (simulate(build_schedule(config, check=False, calls=calls), cost).step_time for calls in (2, 3))
        return three - two
    short, long = (build_schedule(config, check=False, calls=calls) for calls in (2, 2 + _STEADY_CALLS))
    slopes = [
        (simulate(long, cost, seed=seed).step_time - simulate(short, cost, seed=seed + _STEADY_SEEDS).step_time)
        / _STEADY_CALLS
        for seed in range(_STEADY_SEEDS)
    ]
    return sum(slopes) / len(slopes) + _slowest_replica(config, cost)


def _slowest_replica(config: ScheduleConfig, cost: CostModel) -> float:
    """Return how much longer, on average, the slowest of ``data_parallel`` drawn steps is than one drawn step
    (0 with one replica)."""
    replicas = config.data_parallel
    if replicas <= 1:
        return 0.0
    one = build_schedule(config, check=False)
    steps = [simulate(one, cost, seed=seed).step_time for seed in range(_REPLICA_GROUPS * replicas)]
    slowest = [max(steps[group * replicas : (group + 1) * replicas]) for group in range(_REPLICA_GROUPS)]
    return sum(slowest) / len(slowest) - sum(steps) / len(steps)


def _costs_of(schedule: Schedule, cost: CostModel, seed: int = 0) -> WalkCosts:
    """Return the walk's per-stage times of ``schedule`` under ``cost``, drawn (seeded) where it asks for a spread."""
    stages = schedule.placement.stages
    draw = random.Random(seed).gammavariate
    duration = _durations(cost, stages)
    if cost.variation > NEGLIGIBLE_SPREAD:
        duration = {kind: _Drawn(times, cost.variation, draw) for kind, times in duration.items()}
    holds = ((cost.send_time,) * stages, (cost.receive_time,) * stages)
    if cost.hold_variation > NEGLIGIBLE_SPREAD:
        holds = tuple(_Drawn(times, cost.hold_variation, draw) for times in holds)
    boundary = per_stage(cost.boundary_bytes, stages, "boundary_bytes")
    transfer = {
        Kind.SEND_F: tuple(cost.p2p_latency + size / cost.p2p_bandwidth for size in boundary),
        Kind.SEND_B: tuple(
            cost.p2p_latency + (boundary[s - 1] if s else 0.0) / cost.p2p_bandwidth for s in range(stages)
        ),
    }
    collective = _collective_times(schedule.config, cost, stages)
    message_base = message_bases(stages, schedule.microbatch_count)
    pair = (
        max if cost.overlap_pairs else operator.add
    )  # an overlapped pair: its halves one after the other, or together
    ties = _tie_times(schedule, cost)
    return WalkCosts(duration, transfer, collective, message_base, _barrier_time(schedule, cost), *holds, pair, ties)


def _tie_times(schedule: Schedule, cost: CostModel) -> dict:
    """Return, per tie group (its first stage), a ``TIE``'s time: a ring all-reduce of ``tie_bytes`` over the
    group's ranks at the pipeline link's latency and bandwidth (0 where one rank holds the whole group)."""
    rank_of = schedule.placement.rank_of
    return {
        group[0]: collective_time(
            "all_reduce", cost.tie_bytes, len({rank_of(s) for s in group}), cost.p2p_bandwidth, cost.p2p_latency
        )
        for group in schedule.config.ties
    }


def _barrier_time(schedule: Schedule, cost: CostModel) -> float:
    """Return how long a GUARD or CLIP takes once every rank has reached it: one small all-reduce's latency, and
    with clipping the norm and scaling of the busiest rank's stages (every rank waits for the slowest)."""
    if schedule.config.clip_grad_norm is None:
        return cost.p2p_latency
    placement = schedule.placement
    most = max(len(placement.stages_of(rank)) for rank in range(placement.ranks))
    return cost.p2p_latency + most * cost.clip_time


def _durations(cost: CostModel, stages: int) -> dict:
    """Return, per kind on the compute stream, each stage's time (with the per-action overhead)."""
    backward = per_stage(cost.backward_time, stages, "backward_time")
    share = cost.input_gradient_share
    recompute = cost.forward_time if cost.recompute_time is None else cost.recompute_time
    duration = {
        Kind.F: per_stage(cost.forward_time, stages, "forward_time"),
        Kind.B: backward,
        Kind.I: tuple(time * share for time in backward),
        Kind.W: tuple(time * (1 - share) for time in backward),
        Kind.R: per_stage(recompute, stages, "recompute_time"),
        Kind.STEP: (cost.optimizer_time,) * stages,
    }
    if cost.action_overhead:
        duration = {kind: tuple(time + cost.action_overhead for time in times) for kind, times in duration.items()}
    return duration


def _collective_times(config: ScheduleConfig, cost: CostModel, stages: int) -> dict:
    """Return, per collective kind, each stage's time of the whole collective over the data-parallel replicas."""
    weights = per_stage(cost.weight_bytes, stages, "weight_bytes")
    reduce_kind = "all_reduce" if config.zero < 2 else "reduce_scatter"
    replicas, bandwidth, latency = config.data_parallel, cost.data_parallel_bandwidth, cost.data_parallel_latency
    return {
        Kind.GATHER: tuple(collective_time("all_gather", size, replicas, bandwidth, latency) for size in weights),
        Kind.REDUCE: tuple(collective_time(reduce_kind, size, replicas, bandwidth, latency) for size in weights),
    }


class _Drawn:
    """Per stage, a compute time or hold drawn afresh each time it is read: gamma-distributed around the stage's
    mean."""

    def __init__(self, means: tuple[float, ...], variation: float, draw):
        self.shape = 1.0 / variation**2
        self.scales = tuple(mean / self.shape for mean in means)
        self.draw = draw

    def __getitem__(self, stage: int) -> float:
        scale = self.scales[stage]
        return self.draw(self.shape, scale) if scale > 0 else 0.0


def _result(schedule: Schedule, cost: CostModel, run: Walk) -> SimResult:
    """Return the metrics of a finished simulation: step time, bubble, exposed communication, memory, collectives."""
    config, placement, programs = schedule.config, schedule.placement, schedule.programs
    ranks, stages = placement.ranks, placement.stages
    finish = [max(run.compute_free[r], run.p2p_free[r], run.dp_free[r]) for r in range(ranks)]
    exposed = [run.exposed[r] + max(0.0, run.dp_free[r] - run.compute_free[r]) for r in range(ranks)]
    step_time = max(finish, default=0.0)
    activation = per_stage(cost.activation_bytes, stages, "activation_bytes")
    boundary = per_stage(cost.boundary_bytes, stages, "boundary_bytes")
    inputs = tuple(boundary[s - 1] if s else boundary[0] for s in range(stages))
    recomputed = frozenset(config.recomputed_stages)
    metrics = []
    for rank in range(ranks):
        peak = activation_peak(programs[rank], activation, inputs, recomputed)
        metrics.append(
            RankMetrics(rank, run.busy[rank], step_time - run.busy[rank], exposed[rank], peak.count, peak.bytes)
        )
    gathers, reduces, portions = _collective_counts(programs)
    timeline = Timeline(ranks, tuple(run.events), "simulated", "unit", config.schedule, {"config": config.to_json()})
    return SimResult(
        timeline=timeline,
        step_time=step_time,
        ideal_time=max(run.busy, default=0.0),
        bubble_fraction=1 - sum(run.busy) / (ranks * step_time) if step_time else 0.0,
        ranks=tuple(metrics),
        gathers=gathers,
        reduces=reduces,
        reduce_portions=portions,
        programs=programs,
    )


_GATHER, _REDUCE = Kind.GATHER, Kind.REDUCE  # module names: an enum's attribute is slower to read in a hot loop


def _collective_counts(programs) -> tuple[int, int, int]:
    """Return the gathers, the reduces (a portioned one counted once) and the reduce portions of the programs."""
    gathers = reduces = portions = 0
    for program in programs:
        for _, kind, _, portion, _ in program:
            if kind is _GATHER:
                gathers += 1
            elif kind is _REDUCE:
                portions += 1
                reduces += portion is None or portion == 1
    return gathers, reduces, portions


def steady_bubble(events: list[tuple], ranks: int) -> float | None:
    """Return the idle share of the compute streams between every rank's first backward and the first rank's last forward.

    ``None`` when that window is empty (a schedule without a steady state).
    """
    first_backward, last_forward = [None] * ranks, [None] * ranks
    for rank, stream, action, start, end in events:
        if stream != "compute":
            continue
        paired = action.kind is PAIR  # a pair holds a forward and a backward
        if (paired or action.kind in BACKWARD_KINDS) and (first_backward[rank] is None or start < first_backward[rank]):
            first_backward[rank] = start
        if (paired or action.kind is Kind.F) and (last_forward[rank] is None or end > last_forward[rank]):
            last_forward[rank] = end
    if None in first_backward or None in last_forward:
        return None
    low, high = max(first_backward), min(last_forward)
    if high <= low:
        return None
    busy = sum(
        min(end, high) - max(start, low)
        for _, stream, _, start, end in events
        if stream == "compute" and end > low and start < high
    )
    return 1 - busy / (ranks * (high - low))
