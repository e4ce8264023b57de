import pickle
import subprocess
import sys

import pytest

from layerpipe.schedule.actions import (
    AWAITS,
    BACKWARD_KINDS,
    BARRIER_KINDS,
    COLLECTIVE_KINDS,
    COMPUTE_KINDS,
    P2P_KINDS,
    RECEIVE_KINDS,
    SEND_KINDS,
    TIMED_KINDS,
    Action,
    Kind,
    format_program,
    kinds_help,
    parse_action,
    parse_program,
)


@pytest.mark.parametrize(
    "text",
    [
        "2F0",
        "3B7",
        "0I1",
        "0W12",
        "4R3",
        "1SEND_F4",
        "2RECV_F4",
        "3SEND_B0",
        "1RECV_B9",
        "0GATHER",
        "0RELEASE",
        "5REDUCE",
        "0REDUCE[2/4]",
        "7STEP",
    ],
)
def test_every_action_prints_and_parses_back(text):
    assert str(parse_action(text)) == text


def test_parsed_fields():
    assert parse_action("2F0") == Action(2, Kind.F, 0)
    assert parse_action("1SEND_F4") == Action(1, Kind.SEND_F, 4)
    assert parse_action("0REDUCE[2/4]") == Action(0, Kind.REDUCE, None, 2, 4)


def test_compute_notation_matches_torch_pipelining():
    from torch.distributed.pipelining.schedules import _Action

    for text in ["2F0", "3B7", "0I1", "0W12", "1SEND_F4", "2RECV_B3"]:
        assert str(_Action.from_str(text)) == str(parse_action(text))


@pytest.mark.parametrize(
    "text", ["F0", "2X0", "2F", "0GATHER3", "0STEP[1/2]", "0REDUCE[5/4]", "0REDUCE[0/4]", "2F0 1F1"]
)
def test_bad_text_is_refused(text):
    with pytest.raises(ValueError, match="not an action"):
        parse_action(text)


def test_program_round_trip():
    text = "0F0 0SEND_F0 0RECV_B0 0B0 0REDUCE[1/2] 0REDUCE[2/2] 0STEP"
    assert format_program(parse_program(text)) == text


def _example(kind: Kind) -> Action:
    """Return an action of ``kind`` on stage 3, with micro-batch 5 where the kind names one (a pair: with stage 4's
    backward of micro-batch 2)."""
    if kind is Kind.OVERLAP_F_B:
        return Action(3, kind, 5, 4, 2)
    return Action(3, kind, 5 if kind.row.microbatch else None)


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_of_the_table_prints_and_parses_back(kind):
    action = _example(kind)
    assert parse_action(str(action)) == action


@pytest.mark.parametrize("kind", [kind for kind in Kind if kind is not Kind.OVERLAP_F_B])  # a pair: test_dualpipe.py
def test_the_table_decides_whether_a_kind_names_a_microbatch(kind):
    text = str(_example(kind))
    wrong = text[:-1] if kind.row.microbatch else text + "0"
    with pytest.raises(ValueError, match="micro-batch number"):
        parse_action(wrong)


def test_kind_sets_and_wait_rules_come_from_the_table():
    F, B, I, W, R = Kind.F, Kind.B, Kind.I, Kind.W, Kind.R
    assert COMPUTE_KINDS == {F, B, I, W, R, Kind.OVERLAP_F_B}
    assert BACKWARD_KINDS == {B, I, W}
    assert P2P_KINDS == {Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B}
    assert RECEIVE_KINDS == {Kind.RECV_F, Kind.RECV_B} and SEND_KINDS == {Kind.SEND_F, Kind.SEND_B}
    assert COLLECTIVE_KINDS == {Kind.GATHER, Kind.REDUCE} and BARRIER_KINDS == {Kind.GUARD, Kind.CLIP}
    assert TIMED_KINDS == {F, B, I, W, R, Kind.STEP}
    assert AWAITS == {
        **dict.fromkeys([F, B, I, W, R, Kind.OVERLAP_F_B, Kind.RELEASE], Kind.GATHER),
        Kind.STEP: Kind.REDUCE,
    }


def test_a_kind_is_its_notation_to_hashing_and_pickling():
    assert all(hash(kind) == hash(kind.value) and kind == kind.value and str(kind) == kind.value for kind in Kind)
    assert {Kind.SEND_F: 1}["SEND_F"] == 1
    assert pickle.loads(pickle.dumps(Action(1, Kind.GUARD))) == Action(1, Kind.GUARD)
    assert all(pickle.loads(pickle.dumps(kind)) is kind for kind in Kind)


def test_schedule_help_lists_every_action_kind_of_the_table():
    found = subprocess.run(
        [sys.executable, "-m", "layerpipe", "schedule", "--help"], capture_output=True, text=True, check=True
    ).stdout
    words = " ".join(found.split())
    assert kinds_help() in words
    assert all(f"{kind.value} {kind.row.label}" in words for kind in Kind)
    assert "GUARD" in words
