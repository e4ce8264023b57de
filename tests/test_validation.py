import pytest

from layerpipe.schedule.actions import parse_program
from layerpipe.schedule.lowering import add_p2p
from layerpipe.schedule.placement import contiguous
from layerpipe.schedule.validation import ScheduleError, check_transfers, validate

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
