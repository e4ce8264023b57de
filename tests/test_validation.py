import pytest

from layerpipe.schedule.actions import RECEIVE_KINDS, SEND_KINDS, Kind, format_program, parse_program
from layerpipe.schedule.build import Schedule
from layerpipe.schedule.config import ScheduleConfig
from layerpipe.schedule.lowering import add_p2p
from layerpipe.schedule.placement import contiguous
from layerpipe.schedule.validation import ScheduleError, check_transfers, validate
from layerpipe.sim.simulator import simulate

TWO = contiguous(2)


def test_a_correct_schedule_validates(schedule_of):
    schedule = schedule_of("1f1b", 2, 3)
    validate(schedule.programs, schedule.placement, 3)
    validate(schedule.compute, schedule.placement, 3)


def test_missing_backward_names_rank_and_action():
    with pytest.raises(ScheduleError, match=r"rank 1: 1B0 is missing"):
        validate((parse_program("0F0 0B0"), parse_program("1F0")), TWO, 1)


def test_duplicate_action_is_refused():
    with pytest.raises(ScheduleError, match=r"0F0 appears 2 times"):
        validate((parse_program("0F0 0F0 0B0"), parse_program("1F0 1B0")), TWO, 1)


def test_action_on_wrong_rank_is_refused():
    with pytest.raises(ScheduleError, match=r"rank 0: 1F0 belongs to stage 1"):
        validate((parse_program("0F0 1F0 0B0"), parse_program("1B0")), TWO, 1)


def test_backward_before_forward_is_refused():
    with pytest.raises(ScheduleError, match=r"rank 0: 0B0 waits for 0F0"):
        validate((parse_program("0B0 0F0"), parse_program("1F0 1B0")), TWO, 1)


def test_unmatched_send_is_refused():
    programs = (parse_program("0F0 0SEND_F0 0SEND_F0 0RECV_B0 0B0"), parse_program("1RECV_F0 1F0 1B0 1SEND_B0"))
    with pytest.raises(ScheduleError, match=r"0SEND_F0 has no matching receive"):
        validate(programs, TWO, 1)


def test_deadlock_names_each_blocked_rank_and_what_it_waits_for():
    # rank 0 runs its backward of micro-batch 1 before sending micro-batch 1's forward
    compute = (parse_program("0F0 0B0 0F1 0B1"), parse_program("1F1 1B1 1F0 1B0"))
    with pytest.raises(ScheduleError) as error:
        validate(compute, TWO, 2)
    message = str(error.value)
    assert message.startswith("deadlock:")
    assert "rank 0 blocked at 0RECV_B0" in message and "waits for 1SEND_B0 from rank 1" in message
    assert "rank 1 blocked at 1RECV_F1" in message and "waits for 0SEND_F1 from rank 0" in message


def test_sends_do_not_block():
    # both ranks send before receiving: fine when sends are non-blocking
    programs = add_p2p((parse_program("0F0 0B0"), parse_program("1F0 1B0")), TWO)
    check_transfers(programs, TWO)


def test_a_guard_on_one_rank_only_is_refused_as_the_simulator_finds_it_stuck():
    guarded = parse_program("0F0 0SEND_F0 0RECV_B0 0B0 0GUARD 0STEP"), parse_program("1RECV_F0 1F0 1B0 1SEND_B0 1STEP")
    with pytest.raises(ScheduleError, match=r"^deadlock: rank 0 blocked at 0GUARD \(action 4\): waits for rank 1"):
        validate(guarded, TWO, 1)
    with pytest.raises(ScheduleError, match=r"^deadlock: rank 0 blocked at 0GUARD"):
        simulate(Schedule(ScheduleConfig("1f1b", 2, 1), TWO, guarded, guarded))


def test_a_message_sent_twice_is_refused_even_when_received_twice():
    programs = (
        parse_program("0F0 0SEND_F0 0SEND_F0 0RECV_B0 0B0"),
        parse_program("1RECV_F0 1RECV_F0 1F0 1B0 1SEND_B0"),
    )
    with pytest.raises(ScheduleError, match=r"rank 0: 0SEND_F0 is sent 2 times"):
        validate(programs, TWO, 1)


def test_a_receive_without_its_send_and_an_input_used_before_its_receive_are_refused():
    unsent = parse_program("0F0 0SEND_F0 0RECV_B0 0B0"), parse_program("1RECV_F0 1F0 1B0")
    with pytest.raises(ScheduleError, match=r"rank 0: the receive of 1SEND_B0 has no matching send on rank 1"):
        check_transfers(unsent, TWO)
    twice = parse_program("0F0 0SEND_F0 0RECV_B0 0B0"), parse_program("1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F0")
    with pytest.raises(ScheduleError, match=r"rank 1: the receive of 0SEND_F0 has no matching send on rank 0"):
        check_transfers(twice, TWO)
    early = parse_program("0F0 0SEND_F0 0RECV_B0 0B0"), parse_program("1F0 1RECV_F0 1B0 1SEND_B0")
    with pytest.raises(ScheduleError, match=r"rank 1: 1F0 needs 1RECV_F0 before it"):
        check_transfers(early, TWO)


def _verdict(run, *arguments) -> str:
    """Return ``"runs"`` when ``run(*arguments)`` returns, else the ``ScheduleError``'s message."""
    try:
        run(*arguments)
    except ScheduleError as error:
        return str(error)
    return "runs"


def _replaced(programs, rank: int, program):
    """Return the programs with rank ``rank``'s program replaced by ``program``."""
    return (*programs[:rank], tuple(program), *programs[rank + 1 :])


def _moved(programs, rank: int, index: int, to: int):
    """Return the programs with rank ``rank``'s action at ``index`` moved to position ``to`` of its program."""
    program = list(programs[rank])
    program.insert(to, program.pop(index))
    return _replaced(programs, rank, program)


def _broken(schedule):
    """Yield the schedule's programs with one transfer moved (each receive to the front, each send to the end) or
    one rank's guard dropped.

    Coverage, local order and matching still hold; some of them deadlock.
    """
    for rank, program in enumerate(schedule.programs):
        for index, action in enumerate(program):
            if action.kind is Kind.GUARD:
                yield _replaced(schedule.programs, rank, program[:index] + program[index + 1 :])
            elif action.kind in RECEIVE_KINDS:
                yield _moved(schedule.programs, rank, index, 0)
            elif action.kind in SEND_KINDS:
                yield _moved(schedule.programs, rank, index, len(program) - 1)


AGREEMENT_CASES = [
    ("1f1b", 3, 4, 1, {}),
    ("interleaved", 2, 4, 2, {}),
    ("breadth-first", 2, 2, 2, {"data_parallel": 2, "zero": 3}),
    ("zero-bubble", 2, 3, 1, {"skip_nonfinite": True}),
]


@pytest.mark.parametrize(("name", "ranks", "microbatches", "stages_per_rank", "options"), AGREEMENT_CASES)
def test_validation_and_simulation_agree_on_generated_and_on_broken_programs(
    schedule_of, name, ranks, microbatches, stages_per_rank, options
):
    schedule = schedule_of(name, ranks, microbatches, stages_per_rank, **options)
    placement = schedule.placement
    assert _verdict(validate, schedule.programs, placement, microbatches) == "runs"
    assert _verdict(simulate, schedule) == "runs"
    verdicts = []
    for programs in _broken(schedule):
        validated = _verdict(validate, programs, placement, microbatches)
        simulated = _verdict(simulate, Schedule(schedule.config, placement, schedule.compute, programs))
        assert validated == simulated, [format_program(program) for program in programs]
        verdicts.append(validated)
    assert "runs" in verdicts and any(verdict.startswith("deadlock: ") for verdict in verdicts)
