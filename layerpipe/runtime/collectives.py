"""The data-parallel stream of one rank: collectives issued in program order, waited for where first needed.

``GATHER`` and ``REDUCE`` actions issue their collective with
``async_op=True``: gloo runs it on its own worker threads, NCCL on its own
CUDA stream, so it overlaps the compute that follows.  The executor waits
for a stage's gather before the stage's next compute action, for its
reduces before its ``STEP``, and for everything still in flight when the
program ends.  The time the rank spends in those waits is its *exposed*
data-parallel communication.  Since every replica runs the same program,
every replica issues the same collectives in the same order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..schedule.actions import Action, Kind
from .p2p import wait_for


@dataclass
class Issued:
    """A collective in flight: its action, its work (``None`` when there was nothing to send) and when it was issued."""

    action: Action
    work: object
    start: float
    done: list = field(default_factory=list)  # completion time, filled in by the work's future on CPU


class Collectives:
    """Collectives of one rank in flight, by stage and kind, with their measured rows and exposed time."""

    def __init__(self, rank: int, timeout: float, completion_times: bool):
        self.rank = rank
        self.timeout = timeout
        self.completion_times = completion_times
        self.pending: dict[tuple[int, Kind], list[Issued]] = {}
        self.events: list[tuple] = []
        self.exposed = 0.0

    def reset(self) -> None:
        """Forget the rows and exposed time of the previous run."""
        self.events = []
        self.exposed = 0.0

    def issue(self, action: Action, work) -> None:
        """Remember ``work`` issued for ``action``; on CPU its future records when it completes."""
        issued = Issued(action, work, time.perf_counter())
        if work is not None and self.completion_times:
            try:
                future = work.get_future()
            except RuntimeError:  # gloo's list-based reduce-scatter has no future: its row ends when waited for
                future = None
            if future is not None:
                future.then(lambda _: issued.done.append(time.perf_counter()))
        self.pending.setdefault((action.stage, action.kind), []).append(issued)

    def wait(self, stage: int, kind: Kind, needed_by: Action | str) -> None:
        """Wait for the stage's collectives of ``kind`` in flight; ``needed_by`` names what waits, for the error."""
        for issued in self.pending.pop((stage, kind), ()):
            self._wait(issued, needed_by)

    def finish(self) -> None:
        """Wait for every collective still in flight (end of program)."""
        pending, self.pending = self.pending, {}
        for issued_list in pending.values():
            for issued in issued_list:
                self._wait(issued, "the end of the step")

    def _wait(self, issued: Issued, needed_by) -> None:
        start = time.perf_counter()
        if issued.work is not None:
            wait_for(
                issued.work,
                self.timeout,
                self.rank,
                f"waiting at {needed_by} for {issued.action} across the data-parallel replicas",
            )
        end = time.perf_counter()
        self.exposed += end - start
        finished = issued.done[0] if issued.done else end
        self.events.append((self.rank, "data_parallel", issued.action, issued.start, max(finished, issued.start)))
