"""The compute orders, checked against torch.distributed.pipelining's own orders."""

import itertools
import types

import pytest
from torch.distributed.pipelining import schedules as torch_schedules

from layerpipe.schedule import generators, vshape
from layerpipe.schedule.actions import Kind, format_program, parse_program
from layerpipe.schedule.placement import contiguous, looping
from layerpipe.schedule.placement import vshape as vshape_placement
from layerpipe.schedule.validation import validate

SIZES = [(p, v, m) for p, v, m in itertools.product([1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4, 6, 8, 12])]


def torch_order(schedule_class, ranks, stages_per_rank, microbatches, rank):
    """Return torch's compute order for one rank, idle slots dropped (built without process groups)."""
    state = types.SimpleNamespace(
        _num_stages=ranks,
        _stages=[None] * stages_per_rank,
        n_local_stages=stages_per_rank,
        pp_group_size=ranks,
        _n_microbatches=microbatches,
        number_of_rounds=max(1, microbatches // ranks),
        microbatches_per_round=generators.interleaved_group_size(ranks, microbatches),
    )
    if schedule_class is torch_schedules.ScheduleGPipe:
        order = schedule_class._get_pipeline_order(state)[rank]
    else:
        order = schedule_class._calculate_single_rank_operations(state, rank)
    return [str(action) for action in order if action is not None and action.computation_type.value in "FBIW"]


def placement_for(ranks, stages_per_rank):
    return contiguous(ranks) if stages_per_rank == 1 else looping(ranks, stages_per_rank)


@pytest.mark.parametrize("ranks,stages_per_rank,microbatches", [s for s in SIZES if s[1] == 1])
def test_gpipe_equals_torch_schedule_gpipe(ranks, stages_per_rank, microbatches):
    ours = generators.gpipe(contiguous(ranks), microbatches)
    for rank in range(ranks):
        assert [str(a) for a in ours[rank]] == torch_order(torch_schedules.ScheduleGPipe, ranks, 1, microbatches, rank)


@pytest.mark.parametrize("ranks,stages_per_rank,microbatches", SIZES)
def test_breadth_first_equals_torch_looped_bfs(ranks, stages_per_rank, microbatches):
    ours = generators.breadth_first(placement_for(ranks, stages_per_rank), microbatches)
    for rank in range(ranks):
        expected = torch_order(torch_schedules.ScheduleLoopedBFS, ranks, stages_per_rank, microbatches, rank)
        assert [str(a) for a in ours[rank]] == expected


TORCH_ROUNDS = [s for s in SIZES if s[2] % max(1, s[2] // s[0]) == 0]


@pytest.mark.parametrize("ranks,stages_per_rank,microbatches", TORCH_ROUNDS)
def test_interleaved_equals_torch_interleaved_1f1b(ranks, stages_per_rank, microbatches):
    ours = generators.interleaved(placement_for(ranks, stages_per_rank), microbatches)
    for rank in range(ranks):
        expected = torch_order(torch_schedules.ScheduleInterleaved1F1B, ranks, stages_per_rank, microbatches, rank)
        assert [str(a) for a in ours[rank]] == expected


@pytest.mark.parametrize("ranks,stages_per_rank,microbatches", TORCH_ROUNDS)
def test_zero_bubble_equals_torch_interleaved_zero_bubble(ranks, stages_per_rank, microbatches):
    ours = generators.zero_bubble(placement_for(ranks, stages_per_rank), microbatches)
    for rank in range(ranks):
        expected = torch_order(
            torch_schedules.ScheduleInterleavedZeroBubble, ranks, stages_per_rank, microbatches, rank
        )
        assert [str(a) for a in ours[rank]] == expected


def test_1f1b_is_the_standard_order():
    programs = generators.one_f_one_b(contiguous(4), 6)
    assert format_program(programs[0]) == "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5"
    assert format_program(programs[2]) == "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2B5"
    assert format_program(programs[3]) == "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5"


def test_1f1b_with_fewer_microbatches_than_ranks():
    programs = generators.one_f_one_b(contiguous(4), 2)
    assert format_program(programs[0]) == "0F0 0F1 0B0 0B1"


@pytest.mark.parametrize("ranks,stages_per_rank,microbatches", [(2, 2, 4), (4, 2, 8), (4, 3, 12), (3, 2, 9)])
def test_grouped_with_group_size_p_is_interleaved(ranks, stages_per_rank, microbatches):
    placement = looping(ranks, stages_per_rank)
    assert generators.grouped(placement, microbatches, ranks) == generators.interleaved(placement, microbatches)


@pytest.mark.parametrize("ranks,stages_per_rank,microbatches", [(2, 2, 4), (4, 2, 8), (4, 3, 6)])
def test_grouped_with_group_size_m_has_layered_gradient_accumulation(ranks, stages_per_rank, microbatches):
    """Every backward of a stage comes before any backward of an earlier stage on the same rank."""
    for program in generators.grouped(looping(ranks, stages_per_rank), microbatches, microbatches):
        backward_stages = [action.stage for action in program if action.kind is Kind.B]
        assert backward_stages == sorted(backward_stages, reverse=True)
        forward_stages = [action.stage for action in program if action.kind is Kind.F]
        assert forward_stages == sorted(forward_stages)


def test_breadth_first_on_vshape_keeps_turn_local():
    from layerpipe.schedule.placement import vshape

    programs = generators.breadth_first(vshape(2), 2)
    assert programs[1] == parse_program("1F0 1F1 2F0 2F1 2B1 2B0 1B1 1B0")


def torch_zb_v_order(ranks, microbatches, rank):
    """Return ``ScheduleZBVZeroBubble``'s compute order for one rank, idle slots dropped (no process groups)."""
    state = types.SimpleNamespace(pp_group_size=ranks, num_stages=2 * ranks, _n_microbatches=microbatches)
    order = torch_schedules.ScheduleZBVZeroBubble._calculate_single_rank_operations(state, rank)
    return [str(action) for action in order if action is not None]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16])
def test_zb_v_equals_torch_zbv_zero_bubble(ranks, microbatches):
    """Every micro-batch count torch accepts, including fewer than the ``2p - 1`` that fill the V."""
    ours = vshape.zb_v(vshape_placement(ranks), microbatches)
    for rank in range(ranks):
        assert [str(a) for a in ours[rank]] == torch_zb_v_order(ranks, microbatches, rank)
    validate(ours, vshape_placement(ranks), microbatches)


def test_zb_v_reads_as_its_phases_on_the_last_rank():
    """Rank p-1 holds the two middle stages: warm-up forwards, then F/I/W of the V's two halves in turn."""
    programs = vshape.zb_v(vshape_placement(2), 3)
    assert format_program(programs[1]) == "1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1I1 2I2 1I2 1W1 2W2 1W2"
