"""The simulator against the reference facts of the design (bubbles, in-flight activations, collective counts)."""

import dataclasses
import itertools
import math

import pytest

from layerpipe.schedule.actions import Kind, parse_program
from layerpipe.schedule.build import Schedule, build_schedule
from layerpipe.schedule.config import ScheduleConfig
from layerpipe.schedule.lowering import add_p2p
from layerpipe.schedule.placement import contiguous
from layerpipe.schedule.validation import ScheduleError
from layerpipe.schedule.walk import walk, zero_costs
from layerpipe.sim.cost import CostModel, collective_time
from layerpipe.sim.simulator import simulate, steady_step

UNIT = CostModel(forward_time=1, backward_time=2)
DIVISIBLE = [
    (p, v, m)
    for p, v, m in itertools.product([1, 2, 3, 4, 8], [1, 2, 3, 4], [4, 8, 12, 16, 24, 32])
    if m >= p and m % p == 0
]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("ranks,microbatches", [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 5, 8, 16)])
def test_gpipe_and_1f1b_bubble(schedule_of, name, ranks, microbatches):
    result = simulate(schedule_of(name, ranks, microbatches), UNIT)
    assert result.bubble_fraction == pytest.approx((ranks - 1) / (microbatches + ranks - 1), abs=1e-12)


@pytest.mark.parametrize("ranks,stages_per_rank,microbatches", DIVISIBLE)
def test_looping_schedules_bubble(schedule_of, ranks, stages_per_rank, microbatches):
    expected = (ranks - 1) / (stages_per_rank * microbatches + ranks - 1)
    for name, options in [
        ("interleaved", {}),
        ("breadth-first", {}),
        ("grouped", {"group_size": ranks}),
        ("grouped", {"group_size": microbatches}),
    ]:
        result = simulate(schedule_of(name, ranks, microbatches, stages_per_rank, **options), UNIT)
        assert result.bubble_fraction == pytest.approx(expected, abs=1e-12), (name, options)


@pytest.mark.parametrize("ranks,stages_per_rank,microbatches", DIVISIBLE)
def test_zero_bubble_step_fills_the_bubble_with_weight_gradients(schedule_of, ranks, stages_per_rank, microbatches):
    """With F = I = W = 1, ZB-H1's step is 3vm + p - 1, against 3vm + 3(p-1) for 1F1B."""
    result = simulate(schedule_of("zero-bubble", ranks, microbatches, stages_per_rank), UNIT)
    assert result.step_time == pytest.approx(3 * stages_per_rank * microbatches + ranks - 1)


@pytest.mark.parametrize("ranks,microbatches", [(p, m) for p in (1, 2, 4, 8) for m in (1, 3, 8, 16)])
def test_peak_activations(schedule_of, ranks, microbatches):
    gpipe = simulate(schedule_of("gpipe", ranks, microbatches), UNIT)
    assert [rank.peak_activations for rank in gpipe.ranks] == [microbatches] * ranks
    one_f_one_b = simulate(schedule_of("1f1b", ranks, microbatches), UNIT)
    assert [rank.peak_activations for rank in one_f_one_b.ranks] == [min(ranks - r, microbatches) for r in range(ranks)]
    for stages_per_rank in (1, 2, 3):
        breadth_first = simulate(schedule_of("breadth-first", ranks, microbatches, stages_per_rank), UNIT)
        assert [rank.peak_activations for rank in breadth_first.ranks] == [stages_per_rank * microbatches] * ranks


def test_activation_bytes_and_recompute(schedule_of):
    cost = CostModel(activation_bytes=100.0, boundary_bytes=10.0)
    plain = simulate(schedule_of("gpipe", 2, 4), cost)
    recomputed = simulate(schedule_of("gpipe", 2, 4, recompute="full"), cost)
    assert plain.ranks[0].peak_activation_bytes == 400.0
    # three inputs kept, plus one micro-batch recomputed at a time
    assert recomputed.ranks[0].peak_activation_bytes == 4 * 10.0 + 100.0
    assert recomputed.ranks[0].peak_activations == 1
    assert recomputed.ranks[0].busy == plain.ranks[0].busy + 4 * 1.0


def test_ideal_time_and_idle(schedule_of):
    result = simulate(schedule_of("1f1b", 4, 8), UNIT)
    assert result.ideal_time == 24
    assert all(rank.busy + rank.idle == pytest.approx(result.step_time) for rank in result.ranks)


def test_p2p_latency_lengthens_the_step(schedule_of):
    base = simulate(schedule_of("gpipe", 4, 4), UNIT)
    slow = simulate(schedule_of("gpipe", 4, 4), CostModel(p2p_latency=0.5))
    assert slow.step_time == pytest.approx(base.step_time + 2 * 3 * 0.5)
    assert max(rank.exposed_communication for rank in slow.ranks) > 0


def test_ring_collective_formulas():
    assert collective_time("all_gather", 8.0, 4, 1.0, 0.0) == 6.0
    assert collective_time("reduce_scatter", 8.0, 4, 1.0, 0.0) == 6.0
    assert collective_time("all_reduce", 8.0, 4, 1.0, 0.0) == 12.0
    assert collective_time("all_reduce", 8.0, 1, 1.0, 5.0) == 0.0


@pytest.mark.parametrize("microbatches", [4, 8, 16])
def test_breadth_first_zero3_one_gather_and_one_reduce_per_stage(schedule_of, microbatches):
    result = simulate(
        schedule_of("breadth-first", 4, microbatches, 2, data_parallel=2, zero=3),
        CostModel(weight_bytes=1.0, data_parallel_bandwidth=1.0),
    )
    assert (result.gathers, result.reduces) == (8, 8)


def test_interleaved_zero3_needs_more_gathers_with_bounded_buffers(schedule_of):
    cost = CostModel(weight_bytes=1.0, data_parallel_bandwidth=1.0)

    def gathers(name, microbatches):
        config = dict(data_parallel=2, zero=3, weight_buffers=1)
        return simulate(schedule_of(name, 4, microbatches, 2, **config), cost).gathers

    breadth_first = [gathers("breadth-first", m) for m in (4, 8, 16)]
    interleaved = [gathers("interleaved", m) for m in (4, 8, 16)]
    assert breadth_first == [breadth_first[0]] * 3
    assert interleaved[0] == breadth_first[0]  # m = p: one group, the same order of stages
    assert breadth_first[0] < interleaved[1] < interleaved[2]


def test_breadth_first_hides_reduces_better_than_interleaved(schedule_of):
    """A stage's reduce hides behind m backwards in breadth-first, behind N = p in interleaved."""
    cost = CostModel(
        weight_bytes=8.0, data_parallel_bandwidth=1.0
    )  # all-reduce over 8 replicas: 14 units, a backward is 2
    breadth_first = simulate(schedule_of("breadth-first", 4, 16, 2, data_parallel=8), cost)
    interleaved = simulate(schedule_of("interleaved", 4, 16, 2, data_parallel=8), cost)
    exposed = lambda result: max(rank.exposed_communication for rank in result.ranks)  # noqa: E731
    assert exposed(breadth_first) == pytest.approx(14.0)  # only the first stage's reduce is left at the end
    assert exposed(interleaved) > exposed(breadth_first)


def test_without_overlap_communication_occupies_compute(schedule_of):
    schedule = schedule_of("breadth-first", 2, 4, 2, data_parallel=2, zero=0)
    cost = CostModel(weight_bytes=2.0, data_parallel_bandwidth=1.0, overlap=False)
    overlapped = simulate(schedule, CostModel(weight_bytes=2.0, data_parallel_bandwidth=1.0))
    serial = simulate(schedule, cost)
    assert serial.step_time > overlapped.step_time
    assert all(event[1] != "data_parallel" or event[3] <= serial.step_time for event in serial.timeline.events)


def test_reduces_in_portions_split_the_collective_time(schedule_of):
    cost = CostModel(weight_bytes=4.0, data_parallel_bandwidth=1.0)
    result = simulate(schedule_of("breadth-first", 2, 4, 2, data_parallel=2, zero=2, reduce_portions=4), cost)
    durations = [end - start for _, _, action, start, end in result.timeline.events if action.kind.value == "REDUCE"]
    assert durations and all(d == pytest.approx(0.5) for d in durations)
    assert (result.reduces, result.reduce_portions) == (4, 16)


def test_simulator_reports_deadlock():
    placement = contiguous(2)
    programs = add_p2p((parse_program("0F0 0B0 0F1 0B1"), parse_program("1F1 1B1 1F0 1B0")), placement)
    schedule = Schedule(ScheduleConfig("1f1b", 2, 2), placement, programs, programs)
    with pytest.raises(ScheduleError, match="deadlock: rank 0 blocked at 0RECV_B0"):
        simulate(schedule)


def test_timeline_streams_and_json_round_trip(schedule_of):
    from layerpipe.sim.timeline import Timeline

    result = simulate(schedule_of("breadth-first", 2, 2, 2, data_parallel=2, zero=3), CostModel(weight_bytes=1.0))
    assert {event[1] for event in result.timeline.events} == {"compute", "p2p", "data_parallel"}
    again = Timeline.from_json(result.timeline.to_json())
    assert [str(e[2]) for e in again.events] == [str(e[2]) for e in result.timeline.events]
    assert math.isclose(again.step_time, result.timeline.step_time)


def test_evaluation_programs_gather_at_zero3_and_simulate_without_reduces_or_steps(schedule_of):
    schedule = schedule_of("breadth-first", 2, 4, 2, data_parallel=2, zero=3, recompute="full")
    evaluation = schedule.forward_only()
    kinds = {action.kind.value for program in evaluation.programs for action in program}
    assert {"F", "GATHER", "RELEASE", "SEND_F", "RECV_F"} == kinds
    result = simulate(evaluation, CostModel(weight_bytes=2.0, data_parallel_bandwidth=1.0))
    assert (result.gathers, result.reduces) == (4, 0)
    assert result.step_time > simulate(schedule_of("breadth-first", 2, 4, 2).forward_only(), UNIT).step_time


def test_a_send_and_a_receive_hold_their_ranks_for_their_times():
    config = ScheduleConfig(schedule="gpipe", ranks=2, microbatches=1)
    plain = simulate(build_schedule(config), CostModel(forward_time=1.0, backward_time=2.0))
    held = simulate(
        build_schedule(config), CostModel(forward_time=1.0, backward_time=2.0, send_time=0.5, receive_time=0.25)
    )
    assert plain.step_time == 6.0
    assert held.step_time == 6.0 + 2 * (0.5 + 0.25)
    assert max(rank.exposed_communication for rank in held.ranks) >= 0.5 + 0.25


def test_calibration_reads_recompute_times_from_the_timeline():
    from layerpipe.schedule.actions import Action, Kind
    from layerpipe.sim.calibrate import calibrated_cost
    from layerpipe.sim.timeline import Timeline

    events = (
        (0, "compute", Action(0, Kind.F, 0), 0.0, 1.0),
        (0, "compute", Action(1, Kind.F, 0), 1.0, 3.0),
        (0, "compute", Action(1, Kind.B, 0), 3.0, 7.0),
        (0, "compute", Action(0, Kind.R, 0), 7.0, 7.5),
        (0, "compute", Action(0, Kind.B, 0), 7.5, 9.5),
    )
    cost = calibrated_cost(Timeline(1, events, "measured", "s", "t", {}), 2)
    assert cost.recompute_time == (0.5, 2.0)
    assert cost.forward_time == (1.0, 2.0) and cost.backward_time == (2.0, 4.0)


def test_drawn_compute_times_have_the_cost_models_mean_and_spread_and_repeat_with_their_seed():
    config = ScheduleConfig(schedule="gpipe", ranks=1, microbatches=8)
    cost = CostModel(forward_time=2.0, backward_time=4.0, variation=0.3)
    schedule = build_schedule(config)
    forwards = [
        end - start
        for seed in range(200)
        for _, stream, action, start, end in simulate(schedule, cost, seed=seed).timeline.events
        if stream == "compute" and action.kind is Kind.F
    ]
    mean = sum(forwards) / len(forwards)
    spread = (sum((time - mean) ** 2 for time in forwards) / len(forwards)) ** 0.5 / mean
    assert mean == pytest.approx(2.0, rel=0.05) and spread == pytest.approx(0.3, rel=0.1)
    assert simulate(schedule, cost, seed=7).timeline == simulate(schedule, cost, seed=7).timeline
    assert simulate(schedule, cost, seed=7).step_time != simulate(schedule, cost, seed=8).step_time


def test_drawn_holds_have_the_cost_models_mean_and_spread_and_lengthen_the_steady_step():
    config = ScheduleConfig(schedule="1f1b", ranks=2, microbatches=8)
    fixed = CostModel(forward_time=1.0, backward_time=2.0, send_time=0.5, receive_time=0.5)
    drawn = dataclasses.replace(fixed, hold_variation=0.8)
    schedule = build_schedule(config)
    forwards = [
        end - start
        for seed in range(20)
        for _, stream, action, start, end in simulate(schedule, drawn, seed=seed).timeline.events
        if stream == "compute" and action.kind is Kind.F
    ]
    assert forwards and all(time == pytest.approx(1.0) for time in forwards)  # compute times stay fixed
    first_forward_end = [
        next(
            end
            for rank, stream, action, _, end in simulate(schedule, drawn, seed=seed).timeline.events
            if rank == 1 and stream == "compute"
        )
        for seed in range(300)
    ]
    # rank 1's first forward ends after rank 0's forward, the send's hold, rank 1's receive hold and its forward:
    # two independent holds of mean 0.5 and spread 0.8 add up to mean 1 and spread 0.8 / sqrt(2)
    holds = [end - 1.0 - 1.0 for end in first_forward_end]
    mean = sum(holds) / len(holds)
    spread = (sum((hold - mean) ** 2 for hold in holds) / len(holds)) ** 0.5 / mean
    assert mean == pytest.approx(1.0, rel=0.1) and spread == pytest.approx(0.8 / 2**0.5, rel=0.15)
    assert steady_step(config, drawn) > 1.02 * steady_step(config, fixed)


def test_drawn_times_lengthen_the_steady_step_and_replicas_wait_for_the_slowest():
    fixed = CostModel(forward_time=1.0, backward_time=2.0)
    drawn = CostModel(forward_time=1.0, backward_time=2.0, variation=0.5)
    single = ScheduleConfig(schedule="breadth-first", ranks=2, microbatches=4, stages_per_rank=2)
    replicated = ScheduleConfig(schedule="breadth-first", ranks=2, microbatches=4, stages_per_rank=2, data_parallel=2)
    assert steady_step(single, drawn) > 1.02 * steady_step(single, fixed)
    assert steady_step(replicated, fixed) == pytest.approx(steady_step(single, fixed))
    assert steady_step(replicated, drawn) > 1.02 * steady_step(single, drawn)


def test_a_negligible_spread_is_no_spread():
    config = ScheduleConfig(schedule="breadth-first", ranks=2, microbatches=4, stages_per_rank=2)
    fixed = CostModel(forward_time=1.0, backward_time=2.0)
    assert steady_step(config, dataclasses.replace(fixed, variation=1e-200)) == steady_step(config, fixed)


def test_validation_walks_the_programs_as_the_simulator_does_at_zero_cost(schedule_of):
    schedule = schedule_of("breadth-first", 2, 4, 2, data_parallel=2, zero=3, skip_nonfinite=True)
    zero = simulate(schedule, CostModel(forward_time=0, backward_time=0))
    run = walk(schedule.programs, zero_costs(schedule.placement.stages, schedule.microbatch_count))
    assert run.events == list(zero.timeline.events) and zero.step_time == 0.0
    assert run.positions == [len(program) for program in schedule.programs]


def test_simulator_names_what_a_stuck_guard_waits_for():
    placement = contiguous(2)
    programs = parse_program("0F0 0SEND_F0 0RECV_B0 0B0 0GUARD 0STEP"), parse_program("1RECV_F0 1F0 1B0 1SEND_B0 1STEP")
    schedule = Schedule(ScheduleConfig("1f1b", 2, 1), placement, programs, programs)
    with pytest.raises(
        ScheduleError, match=r"deadlock: rank 0 blocked at 0GUARD \(action 4\): waits for rank 1 to reach"
    ):
        simulate(schedule)
