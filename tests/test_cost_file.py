"""Cost files: a CostModel as TOML, read by simulate and compare, refused in one line when it cannot be right."""

from __future__ import annotations

import json
import math

import pytest

from layerpipe.cli import main as layerpipe_main
from layerpipe.knobs import ConfigError
from layerpipe.sim.cost import CostModel
from layerpipe.sim.cost_file import cost_file_text, read_cost_file, write_cost_file


def test_a_cost_file_reads_back_the_cost_model_it_was_written_from(tmp_path):
    cost = CostModel(
        forward_time=(1.5, 2.0), backward_time=(3.0, 4.25), p2p_latency=1e-4, overlap=False, recompute_time=0.5
    )
    path = tmp_path / "cost.toml"
    write_cost_file(str(path), cost, {"machine": 'a "quoted" \\ name', "processes": 2})
    assert read_cost_file(str(path)) == cost
    assert not (tmp_path / "cost.toml.partial").exists()
    assert math.isinf(read_cost_file(str(path)).p2p_bandwidth)


@pytest.mark.parametrize(
    "text, message",
    [
        ("forward_time = -1\n", "forward_time = -1: must be a finite number of at least 0"),
        ("p2p_bandwidth = 0\n", "p2p_bandwidth = 0: "),
        ("speed = 3\n", "unknown key 'speed'"),
        ("forward_time = 'fast'\n", "forward_time = 'fast': "),
        ("forward_time = [1, \n", "is not valid TOML"),
    ],
)
def test_a_cost_file_that_cannot_be_right_is_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "cost.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_cost_file(str(path))
    assert str(path) in str(refused.value) and message in str(refused.value) and "\n" not in str(refused.value)


def test_simulate_starts_from_the_cost_file_and_the_command_line_wins(tmp_path, capsys):
    path = tmp_path / "cost.toml"
    path.write_text(cost_file_text(CostModel(forward_time=3.0, backward_time=6.0), {}))
    assert layerpipe_main(["simulate", "--ranks", "2", "--microbatches", "4", "--cost-file", str(path), "--json"]) == 0
    from_file = capsys.readouterr().out
    assert (
        layerpipe_main(
            [
                "simulate",
                "--ranks",
                "2",
                "--microbatches",
                "4",
                "--cost-file",
                str(path),
                "--forward-time",
                "1",
                "--backward-time",
                "2",
                "--json",
            ]
        )
        == 0
    )
    overridden = capsys.readouterr().out
    assert layerpipe_main(["simulate", "--ranks", "2", "--microbatches", "4", "--json"]) == 0
    assert overridden == capsys.readouterr().out != from_file


def test_a_per_stage_list_of_the_wrong_length_is_named_in_the_files_spelling(tmp_path, capsys):
    path = tmp_path / "cost.toml"
    path.write_text("forward_time = [1.0, 2.0]\n")
    assert layerpipe_main(["simulate", "--ranks", "4", "--cost-file", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"layerpipe simulate: error: {path}: forward_time = (1.0, 2.0): 2 values "
        f"for 8 stages: give one value, or one per stage"
    )


def test_a_missing_cost_file_is_named_as_the_option(capsys):
    assert layerpipe_main(["compare", "--cost-file", "nowhere.toml"]) == 2
    assert capsys.readouterr().err.strip() == "layerpipe compare: error: --cost-file nowhere.toml: no such file"


def test_calibration_takes_mean_durations_and_the_typical_gap_between_actions():
    from layerpipe.schedule.actions import parse_action
    from layerpipe.sim.calibrate import calibrated_cost
    from layerpipe.sim.timeline import Timeline, TimelineEvent

    spans = [("0F0", 0.0, 1.0), ("0F1", 1.1, 4.1), ("0B1", 4.2, 6.2), ("0B0", 6.3, 8.3), ("0STEP", 8.8, 9.0)]
    events = tuple(TimelineEvent(0, "compute", parse_action(action), start, end) for action, start, end in spans)
    cost = calibrated_cost(Timeline(1, events, "measured", "s", "test"), 1)
    assert cost.forward_time == pytest.approx((2.0,)) and cost.backward_time == pytest.approx((2.0,))
    assert cost.optimizer_time == pytest.approx(0.2)
    assert cost.action_overhead == pytest.approx(0.1)  # the gaps are 0.1, 0.1, 0.1 and 0.5


def test_the_action_overhead_lengthens_a_one_rank_step_by_one_overhead_per_compute_action():
    from layerpipe.schedule.build import build_schedule
    from layerpipe.schedule.config import ScheduleConfig
    from layerpipe.sim.simulator import simulate

    schedule = build_schedule(ScheduleConfig("gpipe", ranks=1, microbatches=4))
    plain = simulate(schedule, CostModel()).step_time
    # 4 forwards, 4 backwards and the optimizer step
    assert simulate(schedule, CostModel(action_overhead=0.25)).step_time == pytest.approx(plain + 9 * 0.25)


def test_calibration_takes_the_receive_time_from_receives_whose_message_was_already_sent():
    from layerpipe.schedule.actions import parse_action
    from layerpipe.sim.calibrate import calibrated_cost
    from layerpipe.sim.timeline import Timeline, TimelineEvent

    rows = [
        (0, "compute", "0F0", 0.0, 1.0),
        (0, "p2p", "0SEND_F0", 1.0, 1.1),
        (0, "compute", "0F1", 1.1, 2.1),
        (0, "p2p", "0SEND_F1", 2.1, 2.2),
        (1, "p2p", "1RECV_F0", 0.0, 1.2),  # waited for its message: not a receive's own cost
        (1, "compute", "1F0", 1.2, 2.2),
        (1, "p2p", "1RECV_F1", 2.3, 2.6),  # its message was sent at 2.2: taking it in cost 0.3
        (1, "compute", "1F1", 2.6, 3.6),
    ]
    events = tuple(
        TimelineEvent(rank, stream, parse_action(action), start, end) for rank, stream, action, start, end in rows
    )
    cost = calibrated_cost(Timeline(2, events, "measured", "s", "test"), 2)
    assert cost.receive_time == pytest.approx(0.3)
    assert cost.send_time == pytest.approx(0.1)


def test_calibration_measures_the_spread_of_holds_from_sends_and_ready_receives_weighted_by_their_total():
    from layerpipe.schedule.actions import parse_action
    from layerpipe.sim.calibrate import calibrated_cost
    from layerpipe.sim.timeline import Timeline, TimelineEvent

    # sends hold 0.1 and 0.3 (mean 0.2, deviation 0.1: spread 0.5); the one ready receive is alone: no spread
    rows = [
        (0, "compute", "0F0", 0.0, 1.0),
        (0, "p2p", "0SEND_F0", 1.0, 1.1),
        (0, "compute", "0F1", 1.1, 2.1),
        (0, "p2p", "0SEND_F1", 2.1, 2.4),
        (1, "p2p", "1RECV_F0", 0.0, 1.2),  # waited for its message: not a hold
        (1, "compute", "1F0", 1.2, 2.2),
        (1, "p2p", "1RECV_F1", 2.5, 2.8),
        (1, "compute", "1F1", 2.8, 3.8),
    ]
    events = tuple(
        TimelineEvent(rank, stream, parse_action(action), start, end) for rank, stream, action, start, end in rows
    )
    cost = calibrated_cost(Timeline(2, events, "measured", "s", "test"), 2)
    assert cost.hold_variation == pytest.approx(0.5)


def test_calibration_measures_the_spread_of_compute_times_weighted_by_their_total():
    from layerpipe.schedule.actions import parse_action
    from layerpipe.sim.calibrate import calibrated_cost
    from layerpipe.sim.timeline import Timeline, TimelineEvent

    # forwards 1 and 3 (mean 2, deviation 1: spread 0.5); backwards 4 and 4 (spread 0); steps are left out
    spans = [("0F0", 0.0, 1.0), ("0F1", 1.0, 4.0), ("0B1", 4.0, 8.0), ("0B0", 8.0, 12.0), ("0STEP", 12.0, 20.0)]
    events = tuple(TimelineEvent(0, "compute", parse_action(action), start, end) for action, start, end in spans)
    cost = calibrated_cost(Timeline(1, events, "measured", "s", "test"), 1)
    assert cost.variation == pytest.approx(0.5 * 4 / (4 + 8))


def test_contention_is_compute_time_over_the_time_alone_with_cores_shared_fairly():
    from layerpipe.schedule.actions import parse_action
    from layerpipe.sim.calibrate import contention
    from layerpipe.sim.timeline import Timeline, TimelineEvent

    # ranks 0 and 1 compute together for 2 s, then rank 0 alone for 2 s
    rows = [(0, "0F0", 0.0, 4.0), (1, "1F0", 0.0, 2.0), (1, "1RECV_F1", 2.0, 4.0)]
    events = tuple(
        TimelineEvent(rank, "p2p" if "RECV" in action else "compute", parse_action(action), start, end)
        for rank, action, start, end in rows
    )
    timeline = Timeline(2, events, "measured", "s", "test")
    assert contention(timeline, cores=2) == pytest.approx(1.0)
    assert contention(timeline, cores=1) == pytest.approx(6.0 / 4.0)  # 6 s computed; alone: 1 + 1 + 2 s
    assert contention(timeline, cores=2, replicas=2) == pytest.approx(6.0 / 4.0)
    with pytest.raises(ValueError, match="at least one core"):
        contention(timeline, cores=0)


def test_gather_latency_counts_each_gather_from_when_the_collectives_before_it_ended():
    from layerpipe.schedule.actions import parse_action
    from layerpipe.sim.calibrate import gather_latency
    from layerpipe.sim.timeline import Timeline, TimelineEvent

    # two gathers issued together: the second waits for the first, then takes 3 s; bytes take 1 s at this bandwidth
    rows = [(0, "0GATHER", 0.0, 2.0), (0, "2GATHER", 0.0, 5.0), (0, "0F0", 5.0, 6.0)]
    events = tuple(
        TimelineEvent(rank, "compute" if "F0" in action else "data_parallel", parse_action(action), start, end)
        for rank, action, start, end in rows
    )
    timeline = Timeline(1, events, "measured", "s", "test")
    weights = (4.0, 0.0, 4.0)
    assert gather_latency(timeline, weights, replicas=2, bandwidth=2.0) == pytest.approx(((2 - 1) + (3 - 1)) / 2)
    assert gather_latency(timeline, weights, replicas=1, bandwidth=2.0) is None


def test_simulate_and_compare_default_to_the_layout_the_cost_file_was_measured_on(tmp_path, capsys):
    path = tmp_path / "cost.toml"
    layout = {"ranks": 2, "stages_per_rank": 2, "microbatches": 4, "data_parallel": 1, "zero": 0}
    path.write_text(cost_file_text(CostModel(forward_time=(1.0, 2.0, 3.0, 4.0)), {"machine": "here", **layout}))
    assert layerpipe_main(["simulate", "--cost-file", str(path), "--json"]) == 0  # 4 stages, not the default 8
    config = json.loads(capsys.readouterr().out)["config"]
    assert {key: config[key] for key in layout} == layout
    assert layerpipe_main(["compare", "--schedules", "breadth-first,interleaved", "--cost-file", str(path)]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]] == [
        ["breadth-first", "2"],
        ["interleaved", "2"],
    ]
    assert layerpipe_main(["simulate", "--cost-file", str(path), "--ranks", "4", "--stages-per-rank", "1"]) == 0
    assert layerpipe_main(["simulate", "--cost-file", str(path), "--ranks", "4"]) == 2  # the command line wins
    assert "4 values for 8 stages" in capsys.readouterr().err
