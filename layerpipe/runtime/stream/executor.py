"""The async schedule's interpreter: the executor, with sub-minibatches in flight from one call to the next.

``StreamExecutor`` runs the slices of an async stream (``build.stream_programs``)
one ``train_step`` call after another.  What a forward left for its
backward survives the end of a call; the forward and backward of a
sub-minibatch use the weights its stage's ``WeightVersions`` chooses
(stashed, double-buffered or live, predicted or not), and ``STEP`` updates
the stage through it (spike-compensated or not) and zeroes its gradients.

Each forward and backward is also dated in *ticks*, counted as the rank
runs them: a stage's tick advances at every forward, and at a backward
that does not follow a forward of the same tick (the drain).  So the
staleness the records show is what the program did, not the formula
``2(S-1-s)``; the tests compare the two.

A call ends without waiting for its own sends: some are received only in
the peer's next call (the backward message of the stage's last tick), and
the peer may first wait for this rank's loss.  They are waited for at the
end of the next call, by which time every peer has received them, and at
the end of a drain.

As in the executor, a forward's layers get aliases of the received
activations that they may modify in place (``stage_entry``); under ``live``
weights the first forward gets copies, since the backward's second forward
starts from the stored input.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import ClassVar

import torch

from ...schedule.actions import Action, Kind
from ..context import RankContext
from ..executor import Executor
from ..memory import ActivationMeter
from ..precision import compute
from ..run_state import COMPUTE, LocalStage, RunResult, RunState
from ..schedulers import step_scheduler
from ..stage import as_tuple, backward_roots, carries_gradient
from ..stage_entry import copied, entered
from ..substitute import call_with
from .versions import VersionRecord, WeightVersions, stage_delay


class StreamExecutor(Executor):
    """Runs slices of an async stream on ``context.rank``, one stage per rank, with ``versions`` per local stage."""

    def __init__(
        self,
        context: RankContext,
        stages: dict[int, LocalStage],
        loss_fn: Callable,
        meter: ActivationMeter | None,
        versions: dict[int, WeightVersions],
        group=None,
    ):
        super().__init__(context, stages, loss_fn, meter, group)
        self.versions = versions
        self.carried_inputs: dict = {}  # (stage, micro-batch) -> (inputs, random state) for its backward
        self.carried_outputs: dict = {}  # (stage, micro-batch) -> outputs for its backward
        self.stream_start_tick = 0  # ticks of the streams already drained
        self._slot: dict[int, int] = {}
        self._last_kind: dict[int, Kind] = {}
        self._unsettled: deque = deque()  # sends of the previous call, waited for at the end of this one
        self._draining = False

    @property
    def records(self) -> list[VersionRecord]:
        """Return the version records of this rank's stages, in the order of their backwards."""
        return [record for index in sorted(self.versions) for record in self.versions[index].records]

    def _new_state(self, mailbox, metas, inputs, targets, training: bool) -> RunState:
        """Return a run's state; a training slice continues with the sub-minibatches in flight (``inputs`` by number)."""
        if not training:
            return super()._new_state(mailbox, metas, inputs, targets, training)
        return RunState(
            mailbox,
            metas,
            inputs,
            targets,
            training,
            stage_inputs=self.carried_inputs,
            stage_outputs=self.carried_outputs,
        )

    def drain(self, program, mailbox, metas, fed: int) -> RunResult:
        """Run the drain of the stream (``program``, no inputs), wait for every send, and start a new stream.

        ``fed`` is how many sub-minibatches the drained stream took in.
        """
        self._draining = True
        try:
            return self.run(program, mailbox, metas, {}, None, training=True)
        finally:
            self._draining = False
            self._end_stream(fed)

    def _finish_transfers(self, state: RunState) -> None:
        state.mailbox.settle(self._unsettled)
        if self._draining:
            state.mailbox.finish()
        else:
            self._unsettled = state.mailbox.take_sends()

    def _end_stream(self, fed: int) -> None:
        """Start counting ticks for a new stream after a drained one that fed ``fed`` sub-minibatches."""
        self.stream_start_tick += fed + stage_delay(self.context.placement.stages, 0)
        self._slot.clear()
        self._last_kind.clear()

    def _tick(self, stage: int, kind: Kind) -> int:
        """Return the tick of the stage's forward or backward running now (see the module docstring)."""
        if kind is Kind.F or self._last_kind.get(stage) is not Kind.F:
            self._slot[stage] = self._slot.get(stage, -1) + 1
        self._last_kind[stage] = kind
        return self.stream_start_tick + stage + self._slot[stage]

    # ---------------------------------------------------------------- handlers
    def _stream_forward(self, action: Action, state: RunState) -> str:
        if not state.training:
            return self._forward(action, state)
        stage, microbatch = action.stage, action.microbatch
        versions = self.versions[stage]
        arguments = self._forward_arguments(action, state)
        random_state = torch.get_rng_state()  # live's second forward draws the same dropout masks
        # the layers may modify their inputs in place; live's second forward needs them as they were
        given = entered(arguments) if versions.keeps_graph else copied(arguments)
        with torch.set_grad_enabled(versions.keeps_graph):
            produced = self._versioned_outputs(stage, microbatch, given, versions.forward_weights(), state)
        state.stage_inputs[(stage, microbatch)] = (arguments, random_state)
        state.stage_outputs[(stage, microbatch)] = produced
        versions.forward_ran(microbatch, self._tick(stage, Kind.F))
        return COMPUTE

    def _versioned_outputs(
        self, stage: int, microbatch: int, arguments: tuple, weights: dict, state: RunState
    ) -> tuple:
        """Return the stage's outputs on ``weights``; on the last stage, its loss scaled for the update.

        The last stage keeps the sub-minibatch's loss in ``state.losses``.
        """
        with compute(self.context.precision, self.context.device):
            produced = as_tuple(call_with(self.stages[stage].module, weights, arguments))
        if stage != self.context.last_stage:
            return produced
        value = produced[0] if len(produced) == 1 else produced
        loss = self._loss(value, state.targets[microbatch], microbatch)
        state.losses[microbatch] = loss.detach()
        return (loss * self.loss_scale,)

    def _stream_backward(self, action: Action, state: RunState) -> str:
        stage, microbatch = action.stage, action.microbatch
        key = (stage, microbatch)
        versions = self.versions[stage]
        self.stages[stage].shard.ensure_gradients()
        arguments, random_state = state.stage_inputs.pop(key)
        outputs = state.stage_outputs.pop(key)
        version, weights = versions.backward_weights(microbatch)
        if not versions.keeps_graph:  # the forward again, from the stored input, on the current weights
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.set_rng_state(random_state)
                outputs = self._versioned_outputs(stage, microbatch, entered(arguments), weights, state)
        if stage == self.context.last_stage:
            roots, incoming = list(outputs), None
        else:
            roots, incoming = backward_roots(outputs, state.output_grads.pop(key))
        wanted = [a for a in arguments if carries_gradient(a.dtype)] if stage > 0 else []
        differentiated = wanted + list(weights.values())
        found = (
            torch.autograd.grad(roots, differentiated, incoming, allow_unused=True)
            if roots
            else (None,) * len(differentiated)
        )
        if stage > 0:
            self._deliver_input_grads(
                action,
                state,
                tuple(torch.zeros_like(a) if g is None else g for a, g in zip(wanted, found[: len(wanted)])),
            )
        versions.accumulate(found[len(wanted) :])
        versions.backward_ran(microbatch, self._tick(stage, Kind.B), version)
        return COMPUTE

    def _stream_step(self, action: Action, state: RunState) -> str:
        local = self.stages[action.stage]
        local.shard.reduced()
        self.versions[action.stage].update()
        step_scheduler(local.scheduler)  # after each update of the stage, as its optimizer steps
        local.shard.begin_step()  # zero the gradient buffer for the next virtual minibatch
        return COMPUTE

    HANDLERS: ClassVar[dict] = {
        **Executor.HANDLERS,
        Kind.F: _stream_forward,
        Kind.B: _stream_backward,
        Kind.STEP: _stream_step,
    }
