"""dualpipe-v: torch's order, the overlapped pair's notation, lowering, cost rule and pictures, overlap functions,
float64 equality with the single-process reference, and its refusals."""

from __future__ import annotations

import itertools
import types

import pytest
from test_data_parallel import check_results
from test_data_parallel import run_configurations as run_data_parallel
from test_runtime_equivalence import TOLERANCE, check
from test_runtime_equivalence import run_configurations as run_pipeline
from torch.distributed.pipelining import schedules as torch_schedules

import layerpipe
from layerpipe.schedule.actions import PAIR, Action, Kind, expand_pairs, halves, pair, parse_action, parse_program
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ConfigError, ScheduleConfig, validate_config
from layerpipe.schedule.dualpipe import dualpipe_v
from layerpipe.schedule.placement import vshape
from layerpipe.schedule.validation import ScheduleError, check_matching, validate
from layerpipe.sim.cost import CostModel
from layerpipe.sim.memory import activation_peak
from layerpipe.sim.simulator import simulate
from layerpipe.viz.gantt import _bars_by_colour, _stages_of_ranks


def torch_dualpipe_v_order(ranks: int, microbatches: int, rank: int) -> list[str]:
    """Return ``ScheduleDualPipeV``'s compute order for one rank as torch prints it (no process groups)."""
    state = types.SimpleNamespace(pp_group_size=ranks, _n_microbatches=microbatches)
    order = torch_schedules.ScheduleDualPipeV._calculate_single_rank_operations(state, rank)
    return [str(action) for action in order if action is not None]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5])
def test_the_order_is_torchs_and_parses_back_from_torchs_text(ranks):
    """Every micro-batch count from torch's least (2p) to 2p + 9, and 4p; validated as ours."""
    for microbatches in sorted({*range(2 * ranks, 2 * ranks + 10), 4 * ranks}):
        ours = dualpipe_v(vshape(ranks), microbatches)
        for rank in range(ranks):
            theirs = torch_dualpipe_v_order(ranks, microbatches, rank)
            assert [str(action) for action in ours[rank]] == theirs, (ranks, microbatches, rank)
            assert parse_program(" ".join(theirs)) == ours[rank]
        validate(ours, vshape(ranks), microbatches)
        assert any(action.kind is PAIR for program in ours for action in program) or ranks == 1


def test_a_pair_prints_as_torch_prints_it_and_parses_back():
    action = pair(0, 3, 3, 1)
    assert str(action) == "(0F3;3B1)OVERLAP_F_B" == str(parse_action(" (0F3;3B1)OVERLAP_F_B "))
    assert parse_action(str(action)) == action and halves(action) == (Action(0, Kind.F, 3), Action(3, Kind.B, 1))
    assert expand_pairs((Action(1, Kind.F, 0), action)) == parse_program("1F0 0F3 3B1")
    with pytest.raises(ValueError, match=r"a pair is written \(0F3;3B1\)OVERLAP_F_B"):
        parse_action("0OVERLAP_F_B3")


def test_lowering_receives_both_halves_inputs_before_a_pair_and_sends_both_outputs_after():
    programs = build_schedule(ScheduleConfig("dualpipe-v", 2, 4, recompute="full")).programs
    text = " ".join(map(str, programs[0]))
    assert "3RECV_F1 3F1 (0F3;3B1)OVERLAP_F_B 0SEND_F3 3SEND_B1" in text.replace(" 3R1", "")
    assert "0RECV_B0 0R0 (3F2;0B0)OVERLAP_F_B" in text  # the recompute of the backward half right before the pair


def test_validation_refuses_a_pair_before_the_receipt_of_its_backward_halfs_gradient():
    schedule = build_schedule(ScheduleConfig("dualpipe-v", 2, 4))
    program = list(schedule.programs[0])
    receive = program.index(parse_action("0RECV_B0"))
    program.insert(receive + 1, program.pop(receive))  # now after (3F2;0B0)OVERLAP_F_B
    with pytest.raises(ScheduleError, match=r"^rank 0: \(3F2;0B0\)OVERLAP_F_B needs 0RECV_B0 before it$"):
        check_matching((tuple(program), schedule.programs[1]), schedule.placement)


def test_a_pair_costs_the_sum_of_its_halves_or_their_maximum_when_overlapped():
    schedule = build_schedule(ScheduleConfig("dualpipe-v", 2, 4))
    for overlapped, expected in ((False, 1.0 + 2.0), (True, 2.0)):
        timeline = simulate(schedule, CostModel(forward_time=1.0, backward_time=2.0, overlap_pairs=overlapped)).timeline
        spans = {end - start for _, stream, action, start, end in timeline.events if action.kind is PAIR}
        assert spans == {expected}
    default, overlapped = (simulate(schedule, CostModel(overlap_pairs=flag)).step_time for flag in (False, True))
    assert overlapped < default


@pytest.mark.parametrize("ranks", [2, 3, 4, 6, 8])
def test_with_unit_costs_the_bubble_and_memory_are_deepseeks_formulas(ranks):
    """DualPipeV (DeepSeek's DualPipe repository): bubble (p-1)(F&B+B-3W) in stage times, F&B = F+B when the halves
    run one after the other, i.e. (p-1)/(3m) of the compute; 2p+1 stage activations, p + 1/2 of a whole-rank
    stage's (the table in docs/schedules.md)."""
    for microbatches in (2 * ranks, 4 * ranks):
        cost = CostModel(forward_time=0.5, backward_time=1.0, activation_bytes=0.5)
        result = simulate(build_schedule(ScheduleConfig("dualpipe-v", ranks, microbatches)), cost)
        assert result.step_time / result.ideal_time - 1 == pytest.approx((ranks - 1) / (3 * microbatches))
        assert max(rank.peak_activation_bytes for rank in result.ranks) == ranks + 0.5


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_the_memory_model_counts_a_pair_as_its_forward_then_its_backward(recompute):
    schedule = build_schedule(ScheduleConfig("dualpipe-v", 3, 8, recompute=recompute))
    stages = frozenset(schedule.config.recomputed_stages)
    sizes, inputs = [1.0 + stage for stage in range(6)], [0.25] * 6
    for program in schedule.programs:
        expected = activation_peak(expand_pairs(program), sizes, inputs, stages)
        assert activation_peak(program, sizes, inputs, stages) == expected


def test_the_gantt_chart_draws_both_halves_of_a_pair():
    timeline = simulate(build_schedule(ScheduleConfig("dualpipe-v", 2, 4))).timeline
    bars = _bars_by_colour(timeline, _stages_of_ranks(timeline.events))
    assert {("F", "pair_forward"), ("B", "pair_backward")} <= {(kind, stream) for kind, stream, _ in bars}
    assert not any(kind == PAIR.value for kind, _, _ in bars)


def test_too_few_microbatches_and_one_weight_buffer_are_refused_in_one_line():
    with pytest.raises(ConfigError) as error:
        validate_config(ScheduleConfig("dualpipe-v", 3, 5))
    assert str(error.value) == (
        "microbatches=5: dualpipe-v needs at least as many micro-batches as stages, 6 on 3 ranks"
    )
    with pytest.raises(ConfigError, match=r"^weight_buffers=1: dualpipe-v's pairs use both of a rank's stages"):
        validate_config(ScheduleConfig("dualpipe-v", 2, 4, data_parallel=2, zero=3, weight_buffers=1))


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks", [2, 4])
def test_dualpipe_v_matches_the_single_process_reference(ranks):
    """Losses, gradients and parameters after three AdamW steps, from the least micro-batch count up."""
    check(ranks, [("dualpipe-v", 2, m, None, "mlp") for m in (2 * ranks, 2 * ranks + 1, 3 * ranks)])


@pytest.mark.multiprocess
def test_dualpipe_v_with_data_parallelism_matches_the_reference_at_every_zero_level():
    """2×2: pipeline ranks × replicas, ZeRO 0–3, with and without recomputation and portioned reduces."""
    cases = list(itertools.product(("dualpipe-v",), (0, 1, 2, 3), ("none", "full"), (1, 3)))
    per_process = layerpipe.launch(run_data_parallel, 4, (2, 2, cases), timeout=600)
    check_results(2, 2, cases, per_process)


def _backward_first(forward, backward):
    """An overlap function that runs the halves in the other order (they touch different micro-batches)."""
    _backward_first.calls += 1
    backward()
    forward()


def _failing(forward, backward):
    raise RuntimeError("the expert exchange failed")


def run_with_overlap(function_name: str) -> tuple:
    """Worker: register the named overlap function, train dualpipe-v on 4 micro-batches; return errors and calls."""
    function = {"backward_first": _backward_first, "failing": _failing}[function_name]
    _backward_first.calls = 0
    layerpipe.register_overlap(function)
    try:
        return run_pipeline([("dualpipe-v", 2, 4, None, "mlp")])[0], _backward_first.calls
    finally:
        layerpipe.register_overlap(None)


@pytest.mark.multiprocess
def test_a_registered_overlap_function_runs_every_pair_and_matches_the_reference():
    for (_, loss_error, grad_error, param_error, _), calls in layerpipe.launch(
        run_with_overlap, 2, ("backward_first",)
    ):
        assert calls > 0 and max(loss_error, grad_error, param_error) <= TOLERANCE


@pytest.mark.multiprocess
def test_an_overlap_function_that_raises_is_reported_naming_the_pair_and_the_rank():
    with pytest.raises(layerpipe.LaunchError) as error:
        layerpipe.launch(run_with_overlap, 2, ("failing",), timeout=60)
    message = str(error.value).splitlines()[0]
    assert message.startswith("rank ") and ": the overlap function _failing raised on (" in message
    assert ")OVERLAP_F_B (RuntimeError: the expert exchange failed)" in message


def _fake_executor(ran: list) -> types.SimpleNamespace:
    """An executor whose F and B handlers only note the action they ran."""
    handlers = {Kind.F: lambda executor, action, state: ran.append(str(action)), Kind.B: None}
    handlers[Kind.B] = handlers[Kind.F]
    return types.SimpleNamespace(
        HANDLERS=handlers, collectives=types.SimpleNamespace(pending={}), context=types.SimpleNamespace(rank=1)
    )


def test_a_pair_runs_forward_then_backward_unless_a_function_is_registered_and_each_half_must_run_once():
    from layerpipe.runtime.overlap import OverlapError, register_overlap, run_pair

    ran: list = []
    run_pair(_fake_executor(ran), pair(1, 2, 2, 0), None)
    assert ran == ["1F2", "2B0"]
    register_overlap(lambda forward, backward: (forward(), forward()))
    try:
        with pytest.raises(OverlapError, match=r"^rank 1: .* must run each half of \(1F2;2B0\)OVERLAP_F_B once: "):
            run_pair(_fake_executor([]), pair(1, 2, 2, 0), None)
    finally:
        register_overlap(None)
