"""The async schedule (pipelined backpropagation): a stream without flushes, per-stage updates every k backwards.

Stage ``s`` of ``S`` runs one forward and one backward per tick, so a
sub-minibatch's forward and backward there are ``2(S-1-s)`` ticks apart;
each stage steps after every ``k`` of its backwards; the steady state has no
bubble; stashing weights costs ``ceil(2(S-1-s)/k) + 1`` versions.
"""

from __future__ import annotations

import math

import pytest

from layerpipe.knobs import ConfigError
from layerpipe.schedule.actions import Kind
from layerpipe.schedule.build import build_schedule, stream_programs
from layerpipe.schedule.config import ScheduleConfig
from layerpipe.schedule.validation import validate
from layerpipe.sim.cost import CostModel
from layerpipe.sim.memory import weight_versions
from layerpipe.sim.simulator import simulate


def _schedule(stages, microbatches, every=1, calls=1, **options):
    return build_schedule(
        ScheduleConfig("async", ranks=stages, microbatches=microbatches, update_every=every, **options), calls=calls
    )


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("microbatches, every", [(4, 1), (8, 2), (12, 4)])
def test_the_stream_validates_and_covers_every_sub_minibatch(stages, microbatches, every):
    schedule = _schedule(stages, microbatches, every)
    validate(schedule.programs, schedule.placement, microbatches)


@pytest.mark.parametrize("stages", [2, 4])
def test_forward_and_backward_of_a_sub_minibatch_are_two_ticks_per_later_stage_apart(stages):
    microbatches = 20
    for rank, program in enumerate(_schedule(stages, microbatches).compute):
        forwards = [action.microbatch for action in program if action.kind is Kind.F]
        delay = 2 * (stages - 1 - rank)
        for microbatch in range(microbatches - delay):
            between = program[
                program.index((rank, Kind.F, microbatch, None, None)) : program.index(
                    (rank, Kind.B, microbatch, None, None)
                )
            ]
            assert sum(action.kind is Kind.F for action in between) - 1 == delay, (rank, microbatch)
        assert forwards == list(range(microbatches))


@pytest.mark.parametrize("every", [1, 2, 4])
def test_each_stage_steps_after_every_k_of_its_backwards_without_waiting_for_the_others(every):
    for program in _schedule(4, 16, every).programs:
        backwards = 0
        for action in program:
            if action.kind is Kind.B:
                backwards += 1
            elif action.kind is Kind.STEP:
                assert backwards % every == 0 and backwards
        assert sum(action.kind is Kind.STEP for action in program) == 16 // every


@pytest.mark.parametrize(
    "cost", [CostModel(forward_time=1, backward_time=1), CostModel(forward_time=1, backward_time=2)]
)
def test_the_steady_state_has_no_bubble(cost):
    result = simulate(_schedule(4, 64), cost)
    assert result.steady_bubble is not None and result.steady_bubble < 0.05
    assert result.steady_bubble == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("every", [1, 2, 4])
def test_stashed_weight_versions_per_stage_follow_the_delay_and_the_update_period(every):
    stages = 4
    schedule = _schedule(stages, 64, every)
    for rank, program in enumerate(schedule.programs):
        delay = 2 * (stages - 1 - rank)
        assert weight_versions(program) == {rank: math.ceil(delay / every) + 1}
    result = simulate(schedule)
    assert list(result.weight_versions) == [math.ceil(2 * (stages - 1 - r) / every) + 1 for r in range(stages)]
    assert [rank.peak_activations for rank in result.ranks] == [2 * (stages - 1 - r) + 1 for r in range(stages)]


def test_calls_stream_on_without_draining_between_them():
    two_calls, one_long = _schedule(4, 8, calls=2), _schedule(4, 16)
    assert two_calls.programs == one_long.programs and two_calls.microbatch_count == 16
    assert simulate(two_calls).step_time == simulate(one_long).step_time < 2 * simulate(_schedule(4, 8)).step_time


def test_flushed_schedules_repeat_their_step_over_calls():
    config = ScheduleConfig("1f1b", ranks=4, microbatches=8)
    one, three = simulate(build_schedule(config)), simulate(build_schedule(config, calls=3))
    assert three.step_time == pytest.approx(3 * one.step_time)


def test_with_data_parallelism_each_update_reduces_first():
    program = _schedule(2, 4, 2, data_parallel=2, zero=1).programs[0]
    steps = [index for index, action in enumerate(program) if action.kind is Kind.STEP]
    assert all(program[index - 1].kind is Kind.REDUCE and program[index + 1].kind is Kind.GATHER for index in steps)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(schedule="1f1b", update_every=2), "update_every=2: only the async schedule takes it"),
        (
            dict(schedule="async", microbatches=6, update_every=4),
            "microbatches=6: async needs a multiple of update_every",
        ),
        (dict(schedule="async", data_parallel=2, zero=3), "zero=3: async updates each stage on its own"),
        (dict(schedule="async", stages_per_rank=2), "stages_per_rank=2: async places one stage per rank"),
        (dict(schedule="async", update_every=0), "update_every=0: must be a whole number of at least 1"),
    ],
)
def test_bad_async_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError) as caught:
        build_schedule(ScheduleConfig(**{"ranks": 2, "microbatches": 8, **options}))
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("ranks, microbatches, every", [(2, 4, 2), (4, 4, 1), (4, 6, 3), (3, 2, 1)])
def test_the_slices_a_runtime_runs_call_by_call_make_up_the_whole_stream(ranks, microbatches, every):
    calls = 3
    config = ScheduleConfig("async", ranks=ranks, microbatches=microbatches, update_every=every)
    whole = build_schedule(config, calls=calls)
    slices = [stream_programs(whole, 0, call * microbatches, microbatches, drain=False) for call in range(calls)]
    slices.append(stream_programs(whole, 0, calls * microbatches, 0, drain=True))
    for rank in range(ranks):
        assert sum((part[rank] for part in slices), ()) == whole.programs[rank]


def test_a_stream_restarted_after_a_flush_has_no_backward_of_the_earlier_stream():
    schedule = build_schedule(ScheduleConfig("async", ranks=3, microbatches=4))
    restarted = stream_programs(schedule, 8, 8, 4, drain=False)
    assert all(action.microbatch >= 8 for program in restarted for action in program if action.microbatch is not None)
    assert [str(a) for a in restarted[0] if a.kind.name in ("F", "B")] == ["0F8", "0F9", "0F10", "0F11"]
