"""The async stream's calls: pipelined backpropagation that never drains between ``train_step`` calls.

Each call runs the slice of the stream (``build.stream_programs``) that
feeds its batch's ``microbatches`` sub-minibatches, numbered on across
calls, and returns while the last of them are still in flight; ``flush``
runs the drain.  The interpreter of the slices is ``StreamExecutor``
(``stream.py``); this class keeps where the stream in flight began and
what it was fed.
"""

from __future__ import annotations

from ...schedule.build import stream_programs
from ..batches import Tensors
from ..microbatch_lists import is_listed
from ..p2p import Mailbox
from ..run_state import RunResult
from ..runs import FlushedRuns
from .versions import VersionRecord, stage_delay


class AsyncStream(FlushedRuns):
    """Runs an async schedule's stream one call at a time; evaluation and forward flush it first."""

    streams = True

    def __init__(self, *parts):
        super().__init__(*parts)
        self.stream_start = self.fed = 0  # where the stream in flight began, and the next sub-minibatch
        self._stream_metas: tuple | None = None

    def train(self, inputs: Tensors, targets: Tensors) -> float:
        """Feed the batch's sub-minibatches into the stream; return their mean loss without draining.

        Refuses a list of micro-batches with ``ValueError``: a stream's sub-minibatches share one shape.
        """
        if is_listed(inputs, targets):
            raise ValueError(
                "inputs: a list of micro-batches; schedule='async' streams sub-minibatches of one shape: give one "
                "batch (a tensor or a tuple of tensors), or a flushed schedule for micro-batches of different shapes"
            )
        microbatches = self.batches.microbatches
        programs = stream_programs(self.schedule, self.stream_start, self.fed, microbatches, drain=False)
        posted = self.loss.post()
        result = self._run_call(programs, inputs, targets)
        self.fed += microbatches
        self.last_training = result
        loss = self.loss.share(result, posted)
        self.model.after_training()
        return loss

    def flush(self) -> None:
        """Drain the stream: run the backwards and updates of every sub-minibatch still in flight (if any)."""
        if self.fed == self.stream_start:
            return
        programs = stream_programs(self.schedule, self.stream_start, self.fed, 0, drain=True)
        mailbox = Mailbox(self.executor.context, programs, self._stream_metas, by_receives=True)
        # Not ``last_result``: the timeline shows the last call, and a drain is no call.
        rank = self.executor.context.rank
        self.executor.drain(programs[rank], mailbox, self._stream_metas, self.fed - self.stream_start)
        self.stream_start = self.fed

    def version_records(self) -> list[VersionRecord]:
        """Return, for this rank's stages, which weight version each sub-minibatch met."""
        return self.executor.records

    def weight_versions(self) -> dict[int, int]:
        """Return, per local stage, the most weight versions it held at once."""
        return {index: versions.held_versions for index, versions in self.executor.versions.items()}

    def last_call_records(self) -> list[VersionRecord]:
        """Return this rank's version records of the sub-minibatches the last call ran a forward or backward of."""
        low = self.fed - self.batches.microbatches - stage_delay(self.schedule.placement.stages, 0)
        return [record for record in self.version_records() if record.microbatch >= low]

    def _run_call(self, programs, inputs: Tensors, targets: Tensors) -> RunResult:
        """Run one call's slice, the sub-minibatches numbered on from ``self.fed`` across calls."""
        input_parts, target_parts = self.batches.split(True, inputs, targets)
        metas = self.shapes.metas_for(input_parts[0])
        if self.fed != self.stream_start and metas != self._stream_metas:
            raise ValueError("inputs of another shape or dtype than the sub-minibatches in flight: flush() first")
        self._stream_metas = metas
        mailbox = Mailbox(self.executor.context, programs, metas, by_receives=True)
        numbered = {self.fed + index: part for index, part in enumerate(input_parts)}
        numbered_targets = {self.fed + index: part for index, part in enumerate(target_parts)}
        rank = self.executor.context.rank
        result = self.executor.run(programs[rank], mailbox, metas, numbered, numbered_targets, training=True)
        self.last_result = result
        return result
