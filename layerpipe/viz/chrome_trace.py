"""Chrome trace JSON of a timeline, loadable in Perfetto (ui.perfetto.dev) or chrome://tracing."""

from __future__ import annotations

import json

from ..sim.timeline import STREAMS, Timeline


def chrome_trace(timeline: Timeline) -> dict:
    """Return the trace as a dictionary: one process per rank, one thread per stream.

    Timestamps are microseconds: seconds for measured timelines, and one unit
    of a simulated timeline drawn as one millisecond.
    """
    scale = 1e6 if timeline.unit == "s" else 1e3
    events: list[dict] = []
    for rank in range(timeline.ranks):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for thread, stream in enumerate(STREAMS):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": thread, "args": {"name": stream}})
    for rank, stream, action, start, end in timeline.events:
        events.append(
            {
                "name": str(action),
                "cat": stream,
                "ph": "X",
                "pid": rank,
                "tid": STREAMS.index(stream),
                "ts": start * scale,
                "dur": (end - start) * scale,
            }
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"source": timeline.source, "unit": timeline.unit},
    }


def write_chrome_trace(timeline: Timeline, path: str) -> None:
    """Write the Chrome trace of ``timeline`` to ``path``."""
    with open(path, "w") as handle:
        json.dump(chrome_trace(timeline), handle)
