import json

from layerpipe.schedule.actions import Kind
from layerpipe.sim.cost import CostModel
from layerpipe.sim.simulator import simulate
from layerpipe.viz.chrome_trace import chrome_trace, write_chrome_trace
from layerpipe.viz.gantt import COLOURS, LABELS, draw_timeline, plot_timeline, plot_timelines


def test_gantt_png_is_written(schedule_of, tmp_path):
    result = simulate(schedule_of("breadth-first", 2, 4, 2, data_parallel=2, zero=3), CostModel(weight_bytes=1.0))
    path = tmp_path / "timeline.png"
    plot_timeline(result.timeline, str(path), "breadth-first")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stacked_png_is_written(schedule_of, tmp_path):
    timelines = [simulate(schedule_of(name, 2, 4)).timeline for name in ("gpipe", "1f1b")]
    path = tmp_path / "stacked.png"
    plot_timelines(timelines, str(path), ["gpipe", "1f1b"])
    assert path.stat().st_size > 1000


def test_chrome_trace_has_one_complete_event_per_timeline_event(schedule_of, tmp_path):
    result = simulate(schedule_of("1f1b", 2, 3))
    trace = chrome_trace(result.timeline)
    complete = [event for event in trace["traceEvents"] if event["ph"] == "X"]
    assert len(complete) == len(result.timeline.events)
    assert {event["name"] for event in complete} >= {"0F0", "1B2", "0SEND_F0"}
    path = tmp_path / "trace.json"
    write_chrome_trace(result.timeline, str(path))
    assert json.loads(path.read_text())["traceEvents"][0]["ph"] == "M"


def test_every_action_kind_has_a_colour_and_a_legend_label_from_the_table():
    assert set(COLOURS) == set(LABELS) == {kind.value for kind in Kind}
    assert all(COLOURS[kind.value] == kind.row.colour and LABELS[kind.value] == kind.row.label for kind in Kind)


def test_a_guarded_timeline_names_its_guard_and_the_skipped_steps_in_the_legend(schedule_of):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule = schedule_of("1f1b", 2, 2, skip_nonfinite=True)
    figure, axes = plt.subplots()
    draw_timeline(axes, simulate(schedule, guard_fails=True).timeline)
    labels = set(axes.get_legend_handles_labels()[1])
    plt.close(figure)
    assert {LABELS["GUARD"], LABELS["F"], LABELS["SEND_F"], "skipped (guard)"} <= labels
