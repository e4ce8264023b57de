"""Runs of the flushed schedules: a training step, an evaluation or a forward, each one whole program per call.

``FlushedRuns`` is what ``Pipeline`` calls to run a batch: it checks and
splits the batch (``Batches``), agrees the boundary shapes on first use
(``BoundaryShapes``), runs this rank's program in the executor and shares
the loss (``LossSharing``).  ``LocalModel`` says how the stages run:
evaluation and forward in evaluation mode, training in the mode the user
set, replica 0's buffers given to the other replicas after each training
step.  The async stream (``AsyncStream``) is the same
with sub-minibatches left in flight between calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..schedule.build import Schedule
from .batches import Batches, Tensors
from .executor import Executor
from .loss_sharing import LossSharing
from .microbatch_lists import ListedStep, is_listed
from .replicas import LocalModel
from .run_state import RunResult
from .shapes import BoundaryShapes, signature_of
from .sharding import StageShard
from .stage import ListedMetas
from .stream.versions import VersionRecord


class FlushedRuns:
    """Runs ``schedule``'s programs on batches with ``executor``; every call ends with nothing in flight."""

    streams = False
    """Whether sub-minibatches stay in flight from call to call (the async stream)."""

    def __init__(
        self,
        schedule: Schedule,
        executor: Executor,
        shards: dict[int, StageShard],
        batches: Batches,
        shapes: BoundaryShapes,
        loss: LossSharing,
        model: LocalModel,
    ):
        self.schedule, self.executor, self.shards = schedule, executor, shards
        self.batches, self.shapes, self.loss, self.model = batches, shapes, loss, model
        self.last_result: RunResult | None = None  # of the last run: training, evaluation or forward
        self.last_training: RunResult | None = None

    def train(self, inputs: Tensors, targets: Tensors) -> float:
        """Run one training step on the global batch in the stages' own mode; return its mean loss."""
        inputs = self._listed("train", inputs, targets)  # checked before anything starts
        self.model.before_training()
        for shard in self.shards.values():
            shard.begin_step()
        posted = self.loss.post()
        result = self.run("train", self.schedule.programs, inputs, targets)
        self.last_training = result
        loss = self.loss.share(result, posted)
        self.model.after_training()
        return loss

    def evaluate(self, inputs: Tensors, targets: Tensors) -> float:
        """Return the mean loss over the global batch without gradients, in evaluation mode (flushes a stream first)."""
        inputs = self._listed("eval", inputs, targets)
        self.flush()
        posted = self.loss.post()
        with self.model.evaluating():
            result = self.run("eval", self.schedule.forward, inputs, targets)
        return self.loss.share(result, posted)

    def forward(self, inputs: Tensors):
        """Return the model's output for the whole batch on the last stage's rank, ``None`` elsewhere, in evaluation
        mode (flushes first); refuses a list of micro-batches with ``ValueError``."""
        if is_listed(inputs):
            raise ValueError("inputs: a list; forward takes one batch (a tensor, or a tuple of tensors)")
        self.flush()
        with self.model.evaluating():
            result = self.run("forward", self.schedule.forward, inputs, None, across_replicas=False)
        return self.batches.joined(result.outputs) if result.outputs is not None else None

    def flush(self) -> None:
        """Do nothing: a flushed schedule leaves nothing in flight."""

    def version_records(self) -> list[VersionRecord]:
        """Return no version records: every forward and backward of a step meet the same weights."""
        return []

    def weight_versions(self) -> dict[int, int]:
        """Return no weight versions: each stage holds one."""
        return {}

    def last_call_records(self) -> list[VersionRecord]:
        """Return the version records of the last call's sub-minibatches (none here)."""
        return []

    def run(
        self,
        mode: str,
        programs: Sequence,
        inputs: Tensors,
        targets: Tensors | None,
        across_replicas: bool = True,
    ) -> RunResult:
        """Run this rank's program of ``programs`` on the batch (or list of micro-batches); ``mode``: train, eval or
        forward."""
        if isinstance(inputs, ListedStep):
            step = inputs
            signatures = {signature_of(part) for part in step.everyone}  # every replica decides alike (ZeRO-3)
            agreed = self.shapes.metas_for(step.inputs[0]) if len(signatures) == 1 else ()
            metas = ListedMetas(step.loss_weights, agreed)  # of shapes that differ none agreed: each message announces
            return self._run_program(mode, programs, ("listed", bool(agreed)), metas, step.inputs, step.targets)
        input_parts, target_parts = self.batches.split(mode == "train", inputs, targets, across_replicas)
        # The whole images' shapes, not this band's: two heights can give one band the same rows, and the
        # bands must agree (and gather) together.
        signature = signature_of(input_parts[0])
        input_parts = self.batches.bands(input_parts)
        metas = self.shapes.metas_for_parts(input_parts, signature)
        target_parts = self.batches.target_bands(signature, metas, target_parts)
        return self._run_program(mode, programs, signature, metas, input_parts, target_parts)

    def _listed(self, mode: str, inputs, targets):
        """Return a list of micro-batches checked as a ``ListedStep`` (the inputs themselves when not a list)."""
        if not is_listed(inputs, targets):
            return inputs
        return self.batches.listed(mode == "train", inputs, targets)

    def _run_program(self, mode: str, programs: Sequence, signature, metas, input_parts, target_parts) -> RunResult:
        """Run this rank's program on the split micro-batches with their agreed ``metas``."""
        mailbox = self.executor.mailbox((mode != "train", signature), programs, metas)
        result = self.executor.run(
            programs[self.executor.context.rank], mailbox, metas, input_parts, target_parts, training=mode == "train"
        )
        self.last_result = result
        return result
