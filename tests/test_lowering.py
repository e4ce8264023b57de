from collections import Counter

import pytest

from layerpipe.schedule.actions import Action, Kind, format_program, parse_program
from layerpipe.schedule.lowering import (
    add_gradient_reduces,
    add_optimizer_steps,
    add_p2p,
    add_recompute,
    add_weight_gathers,
)
from layerpipe.schedule.placement import contiguous, looping


def test_p2p_sends_after_producer_and_receives_before_consumer():
    programs = (parse_program("0F0 0B0"), parse_program("1F0 1B0"))
    lowered = add_p2p(programs, contiguous(2))
    assert format_program(lowered[0]) == "0F0 0SEND_F0 0RECV_B0 0B0"
    assert format_program(lowered[1]) == "1RECV_F0 1F0 1B0 1SEND_B0"


def test_p2p_adds_nothing_between_stages_on_one_rank():
    programs = (parse_program("0F0 1F0 1B0 0B0"),)
    assert add_p2p(programs, looping(1, 2)) == programs


def test_p2p_pairs_match_for_looping_placement(schedule_of):
    schedule = schedule_of("interleaved", 3, 6, 2)
    sends = Counter(
        (a.stage, a.kind, a.microbatch) for p in schedule.programs for a in p if a.kind.value.startswith("SEND")
    )
    receives = Counter(
        (
            a.stage - 1 if a.kind is Kind.RECV_F else a.stage + 1,
            Kind.SEND_F if a.kind is Kind.RECV_F else Kind.SEND_B,
            a.microbatch,
        )
        for p in schedule.programs
        for a in p
        if a.kind.value.startswith("RECV")
    )
    assert sends == receives
    assert len(sends) == 2 * (6 - 1) * 6


def test_recompute_comes_after_the_gradient_arrives_and_right_before_backward():
    lowered = add_p2p((parse_program("0F0 0B0"), parse_program("1F0 1B0")), contiguous(2))
    recomputed = add_recompute(lowered, [0])
    assert format_program(recomputed[0]) == "0F0 0SEND_F0 0RECV_B0 0R0 0B0"
    assert recomputed[1] == lowered[1]


def test_recompute_precedes_input_gradient_of_split_backward():
    assert format_program(add_recompute((parse_program("0F0 0I0 0W0"),), [0])[0]) == "0F0 0R0 0I0 0W0"


def gathers_per_rank(programs):
    return [sum(a.kind is Kind.GATHER for a in program) for program in programs]


@pytest.mark.parametrize("microbatches", [4, 8, 16])
def test_breadth_first_gathers_each_stage_once_per_step(schedule_of, microbatches):
    schedule = schedule_of("breadth-first", 2, microbatches, 2, data_parallel=2, zero=3)
    for program in schedule.programs:
        gathered = Counter(a.stage for a in program if a.kind is Kind.GATHER)
        reduced = Counter(a.stage for a in program if a.kind is Kind.REDUCE)
        assert gathered == reduced == Counter({stage: 1 for stage in {a.stage for a in program}})


def test_gathers_with_two_buffers_grow_with_microbatches_for_interleaved_but_not_breadth_first(schedule_of):
    def total(name, m):
        return sum(gathers_per_rank(schedule_of(name, 2, m, 4, data_parallel=2, zero=3, weight_buffers=2).programs))

    # per rank: v gathers in forward, and in backward every stage but the two still held: 2v - 2
    assert [total("breadth-first", m) for m in (4, 8, 16)] == [2 * (2 * 4 - 2)] * 3
    interleaved = [total("interleaved", m) for m in (4, 8, 16)]
    assert interleaved[0] < interleaved[1] < interleaved[2]


def test_gather_is_prefetched_one_run_ahead_and_released_after_last_use():
    program = parse_program("0F0 0F1 2F0 2F1 2B1 2B0 0B1 0B0")
    (lowered,) = add_weight_gathers((program,))
    assert format_program(lowered) == "0GATHER 2GATHER 0F0 0F1 2F0 2F1 2B1 2B0 2RELEASE 0B1 0B0 0RELEASE"
    (limited,) = add_weight_gathers((program,), weight_buffers=1)
    assert format_program(limited) == (
        "0GATHER 0F0 0F1 0RELEASE 2GATHER 2F0 2F1 2B1 2B0 2RELEASE 0GATHER 0B1 0B0 0RELEASE"
    )


def test_reduce_follows_each_stage_last_backward():
    (lowered,) = add_gradient_reduces((parse_program("0F0 2F0 2B0 0I0 0W0"),))
    assert format_program(lowered) == "0F0 2F0 2B0 2REDUCE 0I0 0W0 0REDUCE"


def test_reduce_portions_go_out_lower_stages_first():
    """The first portion of stage s+1 goes out while s computes; then s, then the rest of s+1; stage 0 whole."""
    (lowered,) = add_gradient_reduces((parse_program("4B0 4B1 2B0 2B1 0B0 0B1"),), portions=3)
    assert format_program(lowered) == (
        "4B0 4B1 4REDUCE[1/3] 2B0 2B1 2REDUCE[1/3] 4REDUCE[2/3] 4REDUCE[3/3] "
        "0B0 0B1 0REDUCE[1/3] 0REDUCE[2/3] 0REDUCE[3/3] 2REDUCE[2/3] 2REDUCE[3/3]"
    )


def test_bucketed_reduces_go_out_whole_in_finishing_order():
    (lowered,) = add_gradient_reduces((parse_program("2B0 2B1 0B0 0B1"),), portions=2, order="bucketed")
    assert format_program(lowered) == "2B0 2B1 2REDUCE[1/2] 2REDUCE[2/2] 0B0 0B1 0REDUCE[1/2] 0REDUCE[2/2]"


def test_after_flush_reduces_wait_for_the_ranks_last_backward_then_go_in_finishing_order():
    (lowered,) = add_gradient_reduces((parse_program("2F0 2B0 2B1 0B0 0B1 0RELEASE"),), portions=2, order="after-flush")
    assert format_program(lowered) == (
        "2F0 2B0 2B1 0B0 0B1 2REDUCE[1/2] 2REDUCE[2/2] 0REDUCE[1/2] 0REDUCE[2/2] 0RELEASE"
    )
    (whole,) = add_gradient_reduces((parse_program("2B0 0B0"),), order="after-flush")
    assert format_program(whole) == "2B0 0B0 2REDUCE 0REDUCE"


def test_optimizer_steps_are_appended_lowest_stage_first():
    (plain,) = add_optimizer_steps((parse_program("2F0 0F0 0B0 2B0"),))
    assert format_program(plain[-2:]) == "0STEP 2STEP"
    (zero1,) = add_optimizer_steps((parse_program("0F0 0B0"),), zero=1)
    assert zero1[-2:] == (Action(0, Kind.STEP), Action(0, Kind.GATHER))


def test_early_steps_follow_the_next_stages_reduce_and_the_last_steps_at_the_end():
    program = parse_program("4B0 4REDUCE 2B0 2REDUCE 0B0 0REDUCE")
    (early,) = add_optimizer_steps((program,), zero=2, early=True)
    assert format_program(early) == ("4B0 4REDUCE 2B0 2REDUCE 4STEP 4GATHER 0B0 0REDUCE 2STEP 2GATHER 0STEP 0GATHER")
    (end,) = add_optimizer_steps((program,), zero=3)
    assert format_program(end) == "4B0 4REDUCE 2B0 2REDUCE 0B0 0REDUCE 0STEP 2STEP 4STEP"


def test_early_steps_without_reduces_follow_the_next_stages_last_backward():
    (early,) = add_optimizer_steps((parse_program("2F0 2B0 0F0 0B1 0B0"),), early=True)
    assert format_program(early) == "2F0 2B0 0F0 0B1 0B0 2STEP 0STEP"


def test_early_steps_are_refused_with_reduces_after_the_flush_in_one_line():
    from layerpipe.schedule.config import ConfigError, ScheduleConfig, validate_config

    config = ScheduleConfig(
        "breadth-first", ranks=2, microbatches=4, data_parallel=2, step_placement="early", reduce_order="after-flush"
    )
    with pytest.raises(ConfigError, match=r"step_placement='early': .*after-flush"):
        validate_config(config)


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "breadth-first", "zero-bubble"])
def test_after_flush_puts_every_reduce_after_each_ranks_last_backward_in_a_whole_lowered_schedule(schedule):
    from layerpipe.schedule.actions import BACKWARD_KINDS
    from layerpipe.schedule.build import build_schedule
    from layerpipe.schedule.config import ScheduleConfig

    config = ScheduleConfig(
        schedule,
        ranks=2,
        microbatches=4,
        data_parallel=2,
        zero=3,
        reduce_portions=2,
        reduce_order="after-flush",
        recompute="full",
        skip_nonfinite=True,
    )
    for program in build_schedule(config).programs:
        last_backward = max(index for index, action in enumerate(program) if action.kind in BACKWARD_KINDS)
        reduces = [index for index, action in enumerate(program) if action.kind is Kind.REDUCE]
        steps = [index for index, action in enumerate(program) if action.kind is Kind.STEP]
        stages = {action.stage for action in program if action.kind in BACKWARD_KINDS}
        first = min(reduces)
        assert len(reduces) == 2 * len(stages) and reduces == list(range(first, first + len(reduces)))
        assert all(action.kind is Kind.SEND_B for action in program[last_backward + 1 : first])  # its gradient out
        assert max(reduces) < min(steps)


def test_reduce_order_is_refused_without_replicas_and_on_async_in_one_line():
    from layerpipe.schedule.config import ConfigError, ScheduleConfig, validate_config

    with pytest.raises(ConfigError, match=r"reduce_order='after-flush': .*needs data_parallel above 1"):
        validate_config(ScheduleConfig("1f1b", ranks=2, microbatches=4, reduce_order="after-flush"))
    with pytest.raises(ConfigError, match="reduce_order='bucketed': async"):
        validate_config(ScheduleConfig("async", ranks=2, microbatches=4, data_parallel=2, reduce_order="bucketed"))
