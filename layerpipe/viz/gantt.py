"""Gantt charts of timelines (matplotlib): one band per rank, compute above, communication below.

An overlapped pair (``OVERLAP_F_B``) is drawn as both of its halves over the
pair's span: its forward in the upper half of the compute lane, its backward
in the lower half, each in its own kind's colour and with its micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..schedule.actions import PAIR, RECEIVE_KINDS, Kind, halves
from ..sim.timeline import Timeline

COLOURS = {kind.value: kind.row.colour for kind in Kind}
"""Per action kind, the colour of its bars (from the table of action kinds)."""
LABELS = {kind.value: kind.row.label for kind in Kind}
"""Per action kind, its name in the legend (from the table of action kinds)."""
_LANES = {
    "compute": (0.42, 0.5),
    "pair_forward": (0.67, 0.25),
    "pair_backward": (0.42, 0.25),
    "p2p": (0.22, 0.18),
    "data_parallel": (0.02, 0.18),
}
_COMPUTE_LANES = ("compute", "pair_forward", "pair_backward")
_MAX_LABELLED = 600


def draw_timeline(axes, timeline: Timeline, title: str = "") -> None:
    """Draw ``timeline`` on matplotlib ``axes``: rank 0 on top, forward/backward/communication in distinct colours.

    Compute bars carry their micro-batch number when the step is small enough
    to read; later stages of a rank are drawn lighter.
    """
    _draw_skipped(axes, timeline)
    stages_of_rank = _stages_of_ranks(timeline.events)
    if sum(1 for event in timeline.events if event[1] == "compute") <= _MAX_LABELLED:
        _draw_microbatch_numbers(axes, timeline)
    _draw_bars(axes, timeline.ranks, _bars_by_colour(timeline, stages_of_rank))
    _finish_axes(axes, timeline, title)


def _split_pairs(events):
    """Yield the events with each overlapped pair's replaced by its halves, on the compute lane's two halves."""
    for event in events:
        rank, stream, action, start, end = event
        if stream == "compute" and action.kind is PAIR:
            forward, backward = halves(action)
            yield rank, "pair_forward", forward, start, end
            yield rank, "pair_backward", backward, start, end
        else:
            yield event


def _stages_of_ranks(events) -> dict[int, list[int]]:
    """Return, per rank with events, its stages in the order their compute first appears, sorted."""
    stages_of_rank: dict[int, list[int]] = {}
    for rank, stream, action, _, _ in _split_pairs(events):
        stages_of_rank.setdefault(rank, [])
        if action.stage not in stages_of_rank[rank] and stream in _COMPUTE_LANES:
            stages_of_rank[rank].append(action.stage)
    return {rank: sorted(stages) for rank, stages in stages_of_rank.items()}


def _shown(timeline: Timeline, stream: str, action) -> bool:
    """Return whether an event gets a bar: not a skipped step, and a simulated receive only through its send's bar."""
    if stream == "skipped":
        return False
    return not (stream == "p2p" and action.kind in RECEIVE_KINDS and timeline.source != "measured")


def _bars_by_colour(timeline: Timeline, stages_of_rank: dict[int, list[int]]) -> dict:
    """Return the bars to draw, ``(start, width, rank)``, grouped by ``(kind, stream, depth)``.

    ``depth`` is the stage's place among its rank's stages (0 for the first; communication always 0).
    """
    by_colour: dict[tuple[str, str, float], list[tuple[float, float, int]]] = {}
    for rank, stream, action, start, end in _split_pairs(timeline.events):
        if not _shown(timeline, stream, action):
            continue
        local = stages_of_rank.get(rank, [action.stage])
        depth = local.index(action.stage) / max(1, len(local)) if action.stage in local else 0.0
        key = (action.kind.value, stream, round(depth, 3) if stream in _COMPUTE_LANES else 0.0)
        by_colour.setdefault(key, []).append((start, end - start, rank))
    return by_colour


def _draw_microbatch_numbers(axes, timeline: Timeline) -> None:
    """Write each compute bar's micro-batch number in its middle."""
    for rank, stream, action, start, end in _split_pairs(timeline.events):
        if stream in _COMPUTE_LANES and action.microbatch is not None:
            bottom, height = _LANES[stream]
            axes.text(
                start + (end - start) / 2,
                timeline.ranks - 1 - rank + bottom + height / 2,
                str(action.microbatch),
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )


def _draw_bars(axes, ranks: int, by_colour: dict) -> None:
    """Draw the grouped bars, one ``broken_barh`` per group and rank, each kind named once in the legend."""
    labelled = set()
    for (kind, stream, depth), bars in sorted(by_colour.items()):
        bottom, height = _LANES.get(stream, (0.0, 0.2))
        rows: dict[int, list[tuple[float, float]]] = {}
        for start, width, rank in bars:
            rows.setdefault(rank, []).append((start, width))
        for rank, spans in rows.items():
            legend = LABELS.get(kind) if kind not in labelled else None
            labelled.add(kind)
            axes.broken_barh(
                spans,
                (ranks - 1 - rank + bottom, height),
                facecolors=COLOURS.get(kind, "#999999"),
                alpha=1.0 - 0.45 * depth,
                edgecolor="white",
                linewidth=0.3,
                label=legend,
            )


def _draw_skipped(axes, timeline: Timeline) -> None:
    """Mark the actions a failed guard skipped with a cross on their rank's compute lane."""
    skipped = [(start, rank) for rank, stream, _, start, _ in timeline.events if stream == "skipped"]
    if not skipped:
        return
    bottom, height = _LANES["compute"]
    axes.plot(
        [start for start, _ in skipped],
        [timeline.ranks - 1 - rank + bottom + height / 2 for _, rank in skipped],
        linestyle="none",
        marker="x",
        color="#D62728",
        markersize=7,
        label="skipped (guard)",
    )


def _finish_axes(axes, timeline: Timeline, title: str) -> None:
    """Label the ranks and the time axis, and set the title."""
    axes.set_yticks([timeline.ranks - 1 - rank + 0.5 for rank in range(timeline.ranks)])
    axes.set_yticklabels([f"rank {rank}" for rank in range(timeline.ranks)])
    axes.set_ylim(0, timeline.ranks)
    axes.set_xlim(left=0)
    axes.set_xlabel(f"time ({timeline.unit})")
    if title or timeline.title:
        axes.set_title(title or timeline.title, loc="left", fontsize=10)


def plot_timelines(timelines: Sequence[Timeline], path: str, titles: Sequence[str] = ()) -> None:
    """Write a PNG with the timelines stacked, sharing one time axis, and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(1.2, 0.45 * timeline.ranks + 0.8) for timeline in timelines]
    figure, axes_list = plt.subplots(
        len(timelines),
        1,
        figsize=(12, sum(heights) + 0.6),
        sharex=True,
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for index, (axes, timeline) in enumerate(zip(axes_list[:, 0], timelines)):
        draw_timeline(axes, timeline, titles[index] if index < len(titles) else "")
    handles = {}
    for axes in axes_list[:, 0]:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
    figure.legend(list(handles.values()), list(handles), loc="upper right", fontsize=8, ncol=min(5, len(handles)))
    figure.tight_layout(rect=(0, 0, 1, 0.97 if len(timelines) > 1 else 0.93))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_timeline(timeline: Timeline, path: str, title: str = "") -> None:
    """Write a PNG Gantt chart of one timeline."""
    plot_timelines([timeline], path, [title] if title else [])
