import pytest

from layerpipe.schedule.actions import Action, Kind, format_program, parse_action, parse_program


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
