"""The executor: runs one rank's lowered program with real tensors.

It is the second interpreter of the programs the simulator runs, with the
same semantics: compute actions run in program order on the rank's compute
stream, sends never block, a ``RECV`` blocks until its data has arrived,
``GATHER`` and ``REDUCE`` issue their collective on the data-parallel stream
(``collectives.py``) and return at once, a stage's compute waits for its
gather and its ``STEP`` for its reduces, and ``R`` rebuilds the recorded
regions of a recomputed stage (``recompute.py``).  The executor decides
nothing about order; everything it does is an action of the program.

Each action kind has one handler (``Executor.HANDLERS``, in the spirit of
DeepSpeed's instruction map); the handlers share a ``RunState`` holding the
tensors of one run.  Before a handler runs, the action waits for the
collectives ``AWAITS`` names (the same table the simulator reads).  A new
action kind is a new handler and a table entry.

Gradients: the last stage scales each micro-batch's loss by ``1/(m·d)``
over ``d`` replicas, so the gradients summed by the reduce are those of the
mean loss over the step's global batch (``loss_fn`` returns a mean over its
micro-batch and training micro-batches are equal); an evaluation batch
whose last micro-batch differs weights each micro-batch's loss by its share
of the samples (``UnevenMetas``), so the mean is over samples, and a list
of micro-batches by its share of the counted tokens (``ListedMetas``).  A stage's floating-point inputs
are leaves that require a gradient, so ``B`` (or ``I``) leaves in them the
gradient to send to the previous stage; the layers receive aliases of them
that they may modify in place (``stage_entry``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from ..schedule.actions import AWAITS, Action, Kind, Program
from .clipping import clip
from .collectives import Collectives
from .context import RankContext
from .failure import mark_action
from .guard import guard
from .memory import ActivationMeter, note_saved
from .overlap import run_pair
from .p2p import Mailbox
from .precision import LossScaler, compute, in_float32
from .recompute import Recording, recomputed, recording
from .run_state import COMPUTE, P2P, LocalStage, RunResult, RunState
from .schedulers import step_scheduler
from .shapes import check_agreed
from .stage import (
    ListedMetas,
    PipelineError,
    UnevenMetas,
    backward_roots,
    carries_gradient,
    stage_metas,
    uneven_key,
)
from .stage_entry import entered
from .tags import check_capacity
from .ties import sum_ties

F, B, I, W, R = Kind.F, Kind.B, Kind.I, Kind.W, Kind.R


class Executor:
    """Runs programs of ``context.rank`` over the stages it holds (``stages``, by stage index).

    ``loss_fn(output, target)`` returns a micro-batch's mean loss; ``meter``,
    when given, counts the activation bytes autograd saves.
    """

    def __init__(
        self,
        context: RankContext,
        stages: dict[int, LocalStage],
        loss_fn: Callable,
        meter: ActivationMeter | None = None,
        group=None,
    ):
        check_capacity(context.placement.stages, context.tag_window)
        self.context = context
        self.group = group  # the pipeline's ranks (the default group when there is one pipeline)
        self.scaler = LossScaler() if context.precision == "fp16" else None
        self.stages = stages
        self.loss_fn = loss_fn
        self.meter = meter
        self.loss_scale = 1.0 / (context.microbatches_per_update * context.replicas)
        self.forward_bytes: dict[int, int] = {}  # activation bytes one forward of the stage saved (largest seen)
        self.recompute_bytes: dict[int, int] = {}  # activation bytes one R of the stage added back (largest seen)
        self.collectives = Collectives(context.rank, context.timeout, completion_times=context.device.type == "cpu")
        self._mailboxes: dict[tuple, Mailbox] = {}
        self.ties = None  # the ``LocalTies`` a ``TIE`` sums (set by the assembly)

    # ---------------------------------------------------------------- running
    def mailbox(self, key: tuple, programs: Sequence[Program], metas) -> Mailbox:
        """Return the (cached) mailbox for ``programs`` with boundary ``metas``; ``key`` names the pair."""
        key = (key, uneven_key(metas))
        mailbox = self._mailboxes.get(key)
        if mailbox is None:
            mailbox = Mailbox(self.context, programs, metas)
            self._mailboxes[key] = mailbox
        else:
            mailbox.boundary_metas = metas  # a list of micro-batches keeps one mailbox for every run's shapes
            mailbox.reset()
        return mailbox

    def run(
        self,
        program: Program,
        mailbox: Mailbox,
        metas,
        inputs: Sequence[tuple] | None,
        targets: Sequence | None,
        training: bool,
    ) -> RunResult:
        """Run ``program`` once and return the loss sum, outputs and measured events.

        ``inputs[i]`` and ``targets[i]`` are micro-batch ``i``'s tensors
        (needed only on the ranks of the first and the last stage).  With
        ``training`` false the program must hold forwards, transfers and
        weight gathers only; with ``targets`` ``None`` the last stage keeps
        its outputs instead of computing a loss.  Raises ``PipelineError``
        naming the stage and micro-batch when a stage's output differs from
        the agreed shapes.
        """
        self.collectives.reset()
        state = self._new_state(mailbox, metas, inputs, targets, training)
        if self.meter is None:
            return self._run(program, state)
        self.meter.reset_peak()
        with self.meter.hooks():
            result = self._run(program, state)
        return result._replace(peak_activation_bytes=self.meter.peak)

    def _new_state(self, mailbox: Mailbox, metas, inputs, targets, training: bool) -> RunState:
        """Return the state of a new run (a stream carries what is in flight from run to run)."""
        return RunState(mailbox, metas, inputs, targets, training)

    def _run(self, program: Program, state: RunState) -> RunResult:
        rank, handlers, collectives = self.context.rank, self.HANDLERS, self.collectives
        pending, emit, clock = collectives.pending, state.events.append, time.perf_counter
        _note_buffers(self.stages, state)
        action = None
        try:
            with torch.enable_grad() if state.training else torch.no_grad():
                for index, action in enumerate(program):
                    awaited = AWAITS.get(action.kind)
                    if awaited is not None and (action.stage, awaited) in pending:
                        collectives.wait(action.stage, awaited, action)
                    start = clock()
                    stream = handlers[action.kind](self, action, state)
                    if stream is not None:
                        emit((rank, stream, action, start, clock()))
                    if state.skipped is not None:  # a GUARD failed on some process: every rank skips the rest alike
                        skipped_at = clock()
                        state.events += [
                            (rank, "skipped", later, skipped_at, skipped_at) for later in program[index + 1 :]
                        ]
                        break
        except Exception as error:
            mark_action(error, action)
            raise
        self._finish_transfers(state)
        collectives.finish()
        loss_sum = float(torch.stack([loss.detach() for loss in state.losses.values()]).sum()) if state.losses else None
        outputs = tuple(state.outputs[i] for i in sorted(state.outputs)) if state.outputs else None
        return RunResult(
            loss_sum,
            outputs,
            tuple(state.events) + tuple(collectives.events),
            collectives.exposed,
            buffer_peak=state.buffer_peak,
            skipped=state.skipped,
            grad_norm=state.grad_norm,
        )

    def _finish_transfers(self, state: RunState) -> None:
        """Wait for the run's sends at its end (a stream waits a call later, see ``StreamExecutor``)."""
        state.mailbox.finish()

    # ---------------------------------------------------------------- handlers: compute
    def _forward(self, action: Action, state: RunState) -> str:
        stage, microbatch = action.stage, action.microbatch
        key = (stage, microbatch)
        arguments = self._forward_arguments(action, state)
        saved_before = self.meter.current if self.meter is not None else 0
        mode = self.stages[stage].recompute if state.training else "none"
        given = entered(arguments) if state.training else arguments  # the layers may modify them in place
        if mode == "none":
            produced = self._stage_forward(stage, microbatch, given, state.metas)
        else:
            with recording(state.recordings.setdefault(key, Recording())):
                produced = self._stage_forward(stage, microbatch, given, state.metas, whole=mode == "full")
        if stage == self.context.last_stage:
            if state.targets is None:
                state.outputs[microbatch] = produced
            else:
                value = produced[0] if len(produced) == 1 else produced
                loss = self._loss(value, state.targets[microbatch], microbatch)
                state.losses[microbatch] = weighted(loss, state.metas, microbatch)
        note_saved(self.meter, self.forward_bytes, stage, saved_before)  # with the loss's on the last stage
        if state.training:
            state.stage_inputs[key] = arguments
        state.stage_outputs[key] = produced
        return COMPUTE

    def _forward_arguments(self, action: Action, state: RunState) -> tuple:
        """Return a forward's inputs: the micro-batch, the received activations, or the previous local stage's output."""
        stage, microbatch = action.stage, action.microbatch
        if stage == 0:
            return tuple(t.to(self.context.device, non_blocking=True) for t in state.inputs[microbatch])
        if self.context.placement.receives_forward[stage]:
            arrived = state.received.pop((stage, microbatch))
        elif state.training:  # the previous stage's backward still needs its output
            arrived = state.stage_outputs[(stage - 1, microbatch)]
        else:
            arrived = state.stage_outputs.pop((stage - 1, microbatch))
        return tuple(_leaf(t, state.training) for t in arrived)

    def _backward(self, action: Action, state: RunState) -> str:
        key = self._begin_backward(action, state)
        tensors, grads = self._backward_roots(action, state)
        if tensors:
            torch.autograd.backward(tensors, grads)
        arguments = state.stage_inputs.pop(key)
        del state.stage_outputs[key]
        _free_recording(state.recordings.pop(key, None))
        if action.stage > 0:
            self._deliver_input_grads(
                action, state, tuple(_grad_or_zeros(a) for a in arguments if carries_gradient(a.dtype))
            )
        return COMPUTE

    def _input_backward(self, action: Action, state: RunState) -> str:
        key = self._begin_backward(action, state)
        tensors, grads = self._backward_roots(action, state)
        arguments = state.stage_inputs.pop(key)
        del state.stage_outputs[key]
        if action.stage > 0:
            wanted = [a for a in arguments if carries_gradient(a.dtype)]
            found = (
                torch.autograd.grad(tensors, wanted, grads, retain_graph=True, allow_unused=True)
                if wanted and tensors
                else [None] * len(wanted)
            )
            gradients = tuple(torch.zeros_like(a) if g is None else g for a, g in zip(wanted, found))
            self._deliver_input_grads(action, state, gradients)
        state.held_for_weights[key] = (tensors, grads)
        return COMPUTE

    def _weight_backward(self, action: Action, state: RunState) -> str:
        key = self._begin_backward(action, state)
        tensors, grads = state.held_for_weights.pop(key)
        parameters = self.stages[action.stage].parameters
        if tensors and parameters:
            torch.autograd.backward(tensors, grads, inputs=parameters)
        _free_recording(state.recordings.pop(key, None))
        return COMPUTE

    def _recompute(self, action: Action, state: RunState) -> str:
        saved_before = self.meter.current if self.meter is not None else 0
        with compute(self.context.precision, self.context.device):  # the regions again, in the forward's precision
            state.recordings[(action.stage, action.microbatch)].recompute()
        note_saved(self.meter, self.recompute_bytes, action.stage, saved_before)
        return COMPUTE

    def _step(self, action: Action, state: RunState) -> str:
        local = self.stages[action.stage]
        local.shard.reduced()
        if local.optimizer is not None:
            local.optimizer.step()
            step_scheduler(local.scheduler)  # not reached when a GUARD or CLIP skipped the step
        return COMPUTE

    # ---------------------------------------------------------------- handlers: communication
    def _send(self, action: Action, state: RunState) -> str:
        key = (action.stage, action.microbatch)
        if action.kind is Kind.SEND_B:
            tensors = state.input_grads.pop(key)
        else:
            tensors = state.stage_outputs[key] if state.training else state.stage_outputs.pop(key)
        state.mailbox.send(action, tensors)
        return P2P

    def _receive(self, action: Action, state: RunState) -> str:
        # Measured from the moment the rank waits: the receive itself was posted ahead and runs unseen.
        tensors = state.mailbox.receive(action)
        (state.received if action.kind is Kind.RECV_F else state.output_grads)[(action.stage, action.microbatch)] = (
            tensors
        )
        return P2P

    def _gather(self, action: Action, state: RunState) -> None:
        self.collectives.issue(action, self.stages[action.stage].shard.gather())
        _note_buffers(self.stages, state)

    def _reduce(self, action: Action, state: RunState) -> None:
        self.collectives.issue(
            action, self.stages[action.stage].shard.reduce(action.portion or 1, action.portions or 1)
        )

    def _release_weights(self, action: Action, state: RunState) -> None:
        self.stages[action.stage].shard.release()

    HANDLERS: ClassVar[dict[Kind, Callable]] = {
        F: _forward,
        B: _backward,
        I: _input_backward,
        W: _weight_backward,
        R: _recompute,
        Kind.STEP: _step,
        Kind.SEND_F: _send,
        Kind.SEND_B: _send,
        Kind.RECV_F: _receive,
        Kind.RECV_B: _receive,
        Kind.GATHER: _gather,
        Kind.REDUCE: _reduce,
        Kind.RELEASE: _release_weights,
        Kind.GUARD: guard,
        Kind.CLIP: clip,
        Kind.TIE: sum_ties,
        Kind.OVERLAP_F_B: run_pair,
    }
    """The handler of each action kind; it returns the stream to record the action on, or ``None`` when the
    action records itself (collectives, from issue to completion)."""

    # ---------------------------------------------------------------- helpers
    def _begin_backward(self, action: Action, state: RunState) -> tuple[int, int]:
        """Make sure the stage's gradient buffer exists (the shard's policy); return the action's key."""
        if self.stages[action.stage].shard.ensure_gradients():
            _note_buffers(self.stages, state)
        return action.stage, action.microbatch

    def _stage_forward(self, stage: int, microbatch: int, arguments: tuple, metas, whole: bool = False) -> tuple:
        """Return the stage's outputs for one micro-batch; ``whole``: as one recomputed region (stores its input only)."""
        module = self.stages[stage].module
        with compute(self.context.precision, self.context.device):
            produced = recomputed(module, *arguments) if whole else module(*arguments)
        check_agreed(self.context.rank, stage, microbatch, produced, stage_metas(metas, stage, microbatch))
        return produced

    def _loss(self, value, target, microbatch: int) -> torch.Tensor:
        target = tuple(t.to(self.context.device, non_blocking=True) for t in target)
        _check_no_broadcast(self.context.rank, value, target, microbatch)
        loss = self.loss_fn(in_float32(value), target[0] if len(target) == 1 else target)
        _check_scalar(self.context.rank, loss, microbatch)
        return loss

    def _backward_roots(self, action: Action, state: RunState):
        """Return the tensors to differentiate and their incoming gradients for a stage's backward."""
        stage, microbatch = action.stage, action.microbatch
        if stage == self.context.last_stage:
            scale = self.loss_scale if self.scaler is None else self.loss_scale * self.scaler.scale
            return [state.losses[microbatch] * scale], None
        return backward_roots(state.stage_outputs[(stage, microbatch)], state.output_grads.pop((stage, microbatch)))

    def _deliver_input_grads(self, action: Action, state: RunState, gradients: tuple) -> None:
        """Keep the gradients of a stage's inputs for the previous stage: locally, or to be sent to its rank."""
        stage, microbatch = action.stage, action.microbatch
        if self.context.placement.receives_forward[stage]:
            state.input_grads[(stage, microbatch)] = gradients
        else:
            state.output_grads[(stage - 1, microbatch)] = gradients


def _check_no_broadcast(rank: int, value, target: tuple, microbatch: int) -> None:
    """Refuse, with ``PipelineError``, a floating-point target of another shape than the output it would broadcast against.

    Integer targets (class indices) are left alone: their shape differs from the logits' by design.
    """
    if not isinstance(value, torch.Tensor) or len(target) != 1 or not target[0].is_floating_point():
        return
    if value.shape != target[0].shape:
        raise PipelineError(
            f"rank {rank}: the last stage's output for micro-batch {microbatch} has shape "
            f"{tuple(value.shape)} but its targets {tuple(target[0].shape)}: the loss would broadcast "
            f"one against the other; give targets shaped like the output"
        )


def _check_scalar(rank: int, loss, microbatch: int) -> None:
    """Refuse, with ``PipelineError``, a loss that is not a scalar tensor."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise PipelineError(
            f"rank {rank}: loss_fn returned {type(loss).__name__} "
            f"{tuple(getattr(loss, 'shape', ()))} for micro-batch {microbatch}: "
            f"it must return a scalar tensor (the mean loss over the micro-batch)"
        )


def _note_buffers(stages: dict[int, LocalStage], state: RunState) -> None:
    """Raise the run's buffer peak (bytes of parameter and gradient buffers per kind) to what the shards hold now."""
    totals: dict[str, int] = {}
    for local in stages.values():
        for kind, size in local.shard.buffer_bytes().items():
            totals[kind] = totals.get(kind, 0) + size
    for kind, size in totals.items():
        state.buffer_peak[kind] = max(size, state.buffer_peak.get(kind, 0))


def weighted(loss: torch.Tensor, metas: tuple, microbatch: int) -> torch.Tensor:
    """Return a micro-batch's mean loss weighted by its share of the samples when micro-batches are uneven, or of
    the counted tokens in a list of micro-batches."""
    return loss * metas.loss_weights[microbatch] if type(metas) in (UnevenMetas, ListedMetas) else loss


def _free_recording(recorded: Recording | None) -> None:
    if recorded is not None:
        recorded.release()


def _leaf(tensor: torch.Tensor, training: bool) -> torch.Tensor:
    """Return ``tensor`` cut from its producer's graph; a floating leaf requires a gradient when training."""
    leaf = tensor.detach()
    if training and carries_gradient(leaf.dtype):
        leaf.requires_grad_(True)
    return leaf


def _grad_or_zeros(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
