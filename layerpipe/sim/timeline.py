"""Timelines: start and end of every action on every rank and stream, simulated or measured.

The simulator and the executor both produce a ``Timeline``; pictures, traces
and comparisons read only this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple

from ..schedule.actions import Action, parse_action

STREAMS = ("compute", "p2p", "data_parallel")
"""Each rank has a compute stream, a point-to-point stream and a data-parallel stream."""


class TimelineEvent(NamedTuple):
    """One action on one stream of one rank, from ``start`` to ``end``."""

    rank: int
    stream: str
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """Events of one step; ``source`` is ``simulated`` or ``measured``, ``unit`` the time unit.

    ``events`` are rows ``(rank, stream, action, start, end)`` as named by
    ``TimelineEvent``; the simulator builds them as plain tuples, so read them
    by position or unpacking.
    """

    ranks: int
    events: tuple[TimelineEvent, ...]
    source: str = "simulated"
    unit: str = "unit"
    title: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def step_time(self) -> float:
        """Return the time from the first start to the last end."""
        if not self.events:
            return 0.0
        return max(event[4] for event in self.events) - min(event[3] for event in self.events)

    def to_json(self) -> dict:
        """Return a JSON-ready dictionary (actions written in the compact notation)."""
        return {
            "ranks": self.ranks,
            "source": self.source,
            "unit": self.unit,
            "title": self.title,
            "metadata": self.metadata,
            "events": [[rank, stream, str(action), start, end] for rank, stream, action, start, end in self.events],
        }

    @staticmethod
    def from_json(data: dict) -> Timeline:
        """Return the timeline that ``to_json`` wrote."""
        events = tuple(
            TimelineEvent(int(r), str(s), parse_action(a), float(b), float(e)) for r, s, a, b, e in data["events"]
        )
        return Timeline(
            int(data["ranks"]),
            events,
            data.get("source", "simulated"),
            data.get("unit", "unit"),
            data.get("title", ""),
            dict(data.get("metadata", {})),
        )

    def save(self, path: str) -> None:
        """Write the timeline as JSON to ``path``."""
        with open(path, "w") as handle:
            json.dump(self.to_json(), handle)
