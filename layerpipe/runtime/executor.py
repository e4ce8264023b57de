"""The executor: runs one rank's lowered program with real tensors.

It is the second interpreter of the programs the simulator runs, with the
same semantics: compute actions run in program order on the rank's compute
stream, sends never block, a ``RECV`` blocks until its data has arrived,
``GATHER`` and ``REDUCE`` issue their collective on the data-parallel stream
(``collectives.py``) and return at once, a stage's compute waits for its
gather and its ``STEP`` for its reduces, and ``R`` rebuilds the recorded
regions of a recomputed stage (``recompute.py``).  The executor decides
nothing about order; everything it does is an action of the program.

Gradients: the last stage scales each micro-batch's loss by ``1/(m·d)``
over ``d`` replicas, so the gradients summed by the reduce are those of the
mean loss over the step's global batch (``loss_fn`` returns a mean over its
micro-batch and micro-batches are equal).  A stage's floating-point inputs
are leaves that require a gradient, so ``B`` (or ``I``) leaves in them the
gradient to send to the previous stage.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from ..schedule.actions import COMPUTE_KINDS, Kind, Program
from ..schedule.placement import Placement
from .collectives import Collectives
from .memory import ActivationMeter
from .p2p import Mailbox, failure_reason
from .recompute import Recording, recomputed, recording
from .sharding import StageShard
from .stage import PipelineError, Stage, TensorMeta, carries_gradient, decode_header, encode_header, \
    HEADER_LENGTH, metas_of

F, B, I, W, R = Kind.F, Kind.B, Kind.I, Kind.W, Kind.R
SEND_F, RECV_F, SEND_B, RECV_B, STEP = Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B, Kind.STEP
GATHER, RELEASE, REDUCE = Kind.GATHER, Kind.RELEASE, Kind.REDUCE

_AGREE_TAG = 1 << 28


def _agree_tag(stage: int, slot: int) -> int:
    """Return the tag of slot ``slot`` (0 is the header) of stage ``stage``'s output while agreeing shapes."""
    return _AGREE_TAG + stage * 256 + slot


class RunResult(NamedTuple):
    """What one run of a program produced on this rank.

    ``loss_sum`` is the sum of the micro-batch losses (last stage only, else
    ``None``); ``outputs`` the last stage's outputs per micro-batch in
    forward-only runs; ``events`` the measured ``(rank, stream, action, start,
    end)`` rows in ``time.perf_counter`` seconds: a receive from when the rank
    waits for it to its arrival, a send while it is being posted (gloo tells
    a send's completion only to a wait, which would block), a collective from
    its issue to its completion; ``exposed_data_parallel`` the seconds the
    rank waited for collectives; ``peak_activation_bytes`` the peak of saved
    activations during the run when a meter is attached; ``buffer_peak`` the
    peak bytes of the stages' parameter and gradient buffers, per kind.
    """

    loss_sum: float | None
    outputs: tuple | None
    events: tuple[tuple, ...]
    exposed_data_parallel: float = 0.0
    peak_activation_bytes: int | None = None
    buffer_peak: dict | None = None


class Executor:
    """Runs programs of ``rank`` over the stages it holds.

    ``global_ranks[r]`` is the process-group rank of pipeline rank ``r``.
    """

    def __init__(self, rank: int, placement: Placement, microbatches: int, stages: dict[int, Stage],
                 loss_fn: Callable, device: torch.device, timeout: float, global_ranks: Sequence[int],
                 optimizers: dict[int, torch.optim.Optimizer] | None = None, lookahead: int = 1,
                 shards: dict[int, StageShard] | None = None, recompute: dict[int, str] | None = None,
                 replicas: int = 1, meter: ActivationMeter | None = None):
        self.rank = rank
        self.placement = placement
        self.microbatches = microbatches
        self.stages = stages
        self.loss_fn = loss_fn
        self.device = device
        self.timeout = timeout
        self.global_ranks = tuple(global_ranks)
        self.optimizers = optimizers or {}
        self.lookahead = lookahead
        self.shards = shards or {}
        self.recompute = recompute or {}
        self.loss_scale = 1.0 / (microbatches * replicas)
        self.meter = meter
        self.forward_bytes: dict[int, int] = {}  # activation bytes one forward of the stage saved (largest seen)
        self.recompute_bytes: dict[int, int] = {}  # activation bytes one R of the stage added back (largest seen)
        self.last_stage = placement.stages - 1
        self.parameters = {s: [p for p in stage.parameters() if p.requires_grad] for s, stage in stages.items()}
        self.collectives = Collectives(rank, timeout, completion_times=device.type == "cpu")
        self._mailboxes: dict[tuple, Mailbox] = {}

    # ---------------------------------------------------------------- agreement
    def agree(self, first_microbatch: tuple[torch.Tensor, ...]) -> tuple[tuple[TensorMeta, ...], ...]:
        """Return every stage's output metas, found by passing micro-batch 0 through the pipeline once.

        Each rank runs its stages without gradients in stage order and sends
        a header and the tensors to the next stage's rank.  Collective: every
        rank calls it with the same input.
        """
        ranks = self.placement.stage_ranks
        metas: list[tuple[TensorMeta, ...]] = []
        previous_output = None
        with torch.no_grad():
            for stage in range(self.placement.stages):
                owner = ranks[stage]
                if owner == self.rank:
                    if stage == 0:
                        inputs = tuple(t.to(self.device) for t in first_microbatch)
                    elif ranks[stage - 1] == self.rank:
                        inputs = previous_output
                    else:
                        inputs = self._agree_receive(stage, ranks[stage - 1])
                    try:
                        previous_output = self.stages[stage](*inputs)
                    except Exception as error:
                        raise PipelineError(f"rank {self.rank}: stage {stage} failed on micro-batch 0 "
                                          f"while agreeing tensor shapes: {error}") from error
                    found = metas_of(previous_output)
                    if stage < self.last_stage and ranks[stage + 1] != self.rank:
                        self._agree_send(stage, ranks[stage + 1], previous_output, found)
                else:
                    found = None
                metas.append(found)
        return self._share_metas(metas)

    def _agree_send(self, stage: int, peer: int, tensors, metas) -> None:
        destination = self.global_ranks[peer]
        dist.send(encode_header(metas).to(self.device), dst=destination, tag=_agree_tag(stage, 0))
        for slot, tensor in enumerate(tensors):
            dist.send(tensor.contiguous(), dst=destination, tag=_agree_tag(stage, 1 + slot))

    def _agree_receive(self, stage: int, peer: int) -> tuple[torch.Tensor, ...]:
        source = self.global_ranks[peer]
        header = torch.empty(HEADER_LENGTH, dtype=torch.int64, device=self.device)
        try:
            dist.recv(header, src=source, tag=_agree_tag(stage - 1, 0))
            tensors = []
            for slot, meta in enumerate(decode_header(header.cpu())):
                buffer = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
                dist.recv(buffer, src=source, tag=_agree_tag(stage - 1, 1 + slot))
                tensors.append(buffer)
        except RuntimeError as error:
            raise PipelineError(f"rank {self.rank}: failed while agreeing tensor shapes, waiting for stage "
                                f"{stage - 1}'s output from rank {peer} ({failure_reason(error)})"
                                ) from error
        return tuple(tensors)

    def _share_metas(self, metas: list) -> tuple[tuple[TensorMeta, ...], ...]:
        """Return the metas of every stage, each filled in by the rank that owns it."""
        if len(self.global_ranks) == 1:
            return tuple(metas)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [(s, m) for s, m in enumerate(metas) if m is not None])
        merged = list(metas)
        for part in gathered:
            for stage, found in part or ():
                merged[stage] = tuple(TensorMeta(tuple(shape), dtype) for shape, dtype in found)
        return tuple(merged)

    # ---------------------------------------------------------------- running
    def mailbox(self, key: tuple, programs: Sequence[Program], metas) -> Mailbox:
        """Return the (cached) mailbox for ``programs`` with boundary ``metas``; ``key`` names the pair."""
        mailbox = self._mailboxes.get(key)
        if mailbox is None:
            mailbox = Mailbox(self.rank, programs, self.placement, self.microbatches, metas, self.device,
                              self.timeout, self.lookahead, self.global_ranks)
            self._mailboxes[key] = mailbox
        else:
            mailbox.reset()
        return mailbox

    def run(self, program: Program, mailbox: Mailbox, metas, inputs: Sequence[tuple] | None,
            targets: Sequence | None, training: bool) -> RunResult:
        """Run ``program`` once and return the loss sum, outputs and measured events.

        ``inputs[i]`` and ``targets[i]`` are micro-batch ``i``'s tensors
        (needed only on the ranks of the first and the last stage).  With
        ``training`` false the program must hold forwards and transfers only;
        with ``targets`` ``None`` the last stage keeps its outputs instead of
        computing a loss.  Raises ``PipelineError`` naming the stage and
        micro-batch when a stage's output differs from the agreed shapes.
        """
        self.collectives.reset()
        if self.meter is not None:
            self.meter.reset_peak()
            with self.meter.hooks():
                result = self._run(program, mailbox, metas, inputs, targets, training)
            return result._replace(peak_activation_bytes=self.meter.peak)
        return self._run(program, mailbox, metas, inputs, targets, training)

    def _run(self, program, mailbox, metas, inputs, targets, training) -> RunResult:
        rank, ranks, last = self.rank, self.placement.stage_ranks, self.last_stage
        scale = self.loss_scale
        stage_inputs: dict[tuple[int, int], tuple] = {}
        stage_outputs: dict[tuple[int, int], tuple] = {}
        received: dict[tuple[int, int], tuple] = {}
        output_grads: dict[tuple[int, int], tuple] = {}
        input_grads: dict[tuple[int, int], tuple] = {}
        held_for_weights: dict[tuple[int, int], tuple] = {}
        recordings: dict[tuple[int, int], Recording] = {}
        losses: dict[int, torch.Tensor] = {}
        outputs: dict[int, tuple] = {}
        events: list[tuple] = []
        emit = events.append
        clock = time.perf_counter
        collectives = self.collectives
        pending = collectives.pending
        buffer_peak: dict[str, int] = {}
        self._note_buffers(buffer_peak)
        grad_mode = torch.enable_grad() if training else torch.no_grad()

        with grad_mode:
            for action in program:
                stage, kind, microbatch = action[0], action[1], action[2]
                key = (stage, microbatch)
                if (stage, GATHER) in pending and kind in COMPUTE_KINDS:
                    collectives.wait(stage, GATHER, action)
                start = clock()
                if kind is F:
                    if stage == 0:
                        arguments = tuple(t.to(self.device, non_blocking=True) for t in inputs[microbatch])
                    else:
                        if ranks[stage - 1] != rank:
                            arrived = received.pop(key)
                        elif training:  # the previous stage's backward still needs its output
                            arrived = stage_outputs[(stage - 1, microbatch)]
                        else:
                            arrived = stage_outputs.pop((stage - 1, microbatch))
                        arguments = tuple(_leaf(t, training) for t in arrived)
                    saved_before = self.meter.current if self.meter is not None else 0
                    mode = self.recompute.get(stage, "none") if training else "none"
                    if mode == "none":
                        produced = self._forward(stage, microbatch, arguments, metas)
                    else:
                        with recording(recordings.setdefault(key, Recording())):
                            produced = self._forward(stage, microbatch, arguments, metas, whole=mode == "full")
                    if stage == last:
                        value = produced[0] if len(produced) == 1 else produced
                        if targets is None:
                            outputs[microbatch] = produced
                        else:
                            losses[microbatch] = self._loss(value, targets[microbatch], microbatch)
                    self._note_saved(self.forward_bytes, stage, saved_before)  # with the loss's on the last stage
                    if training:
                        stage_inputs[key] = arguments
                    stage_outputs[key] = produced
                elif kind is B or kind is I or kind is W:
                    shard = self.shards.get(stage)
                    if shard is not None and shard.zero >= 2 and not shard.has_gradients:
                        shard.before_backward()
                        self._note_buffers(buffer_peak)
                    if kind is W:
                        tensors, grads = held_for_weights.pop(key)
                    else:
                        tensors, grads = self._backward_roots(stage, microbatch, stage_outputs, output_grads,
                                                              losses, scale)
                    if kind is B:
                        if tensors:
                            torch.autograd.backward(tensors, grads)
                        arguments = stage_inputs.pop(key)
                        del stage_outputs[key]
                        _release(recordings.pop(key, None))
                        if stage > 0:
                            gradients = tuple(_grad_or_zeros(a) for a in arguments if carries_gradient(a.dtype))
                            self._deliver_input_grads(stage, microbatch, gradients, output_grads, input_grads)
                    elif kind is I:
                        arguments = stage_inputs.pop(key)
                        del stage_outputs[key]
                        wanted = [a for a in arguments if carries_gradient(a.dtype)] if stage > 0 else []
                        if wanted and tensors:
                            found = torch.autograd.grad(tensors, wanted, grads, retain_graph=True, allow_unused=True)
                            gradients = tuple(torch.zeros_like(a) if g is None else g for a, g in zip(wanted, found))
                        else:
                            gradients = tuple(torch.zeros_like(a) for a in wanted)
                        if stage > 0:
                            self._deliver_input_grads(stage, microbatch, gradients, output_grads, input_grads)
                        held_for_weights[key] = (tensors, grads)
                    else:
                        if tensors and self.parameters[stage]:
                            torch.autograd.backward(tensors, grads, inputs=self.parameters[stage])
                        _release(recordings.pop(key, None))
                elif kind is R:
                    saved_before = self.meter.current if self.meter is not None else 0
                    recordings[key].recompute()
                    self._note_saved(self.recompute_bytes, stage, saved_before)
                elif kind is SEND_F or kind is SEND_B:
                    if kind is SEND_F:
                        mailbox.send(action, stage_outputs[key] if training else stage_outputs.pop(key))
                    else:
                        mailbox.send(action, input_grads.pop(key))
                    emit((rank, "p2p", action, start, clock()))
                    continue
                elif kind is RECV_F or kind is RECV_B:
                    tensors = mailbox.receive(action)
                    (received if kind is RECV_F else output_grads)[key] = tensors
                    # From the moment the rank waits: the receive itself was posted ahead and runs unseen.
                    emit((rank, "p2p", action, start, clock()))
                    continue
                elif kind is GATHER:
                    collectives.issue(action, self.shards[stage].gather())
                    self._note_buffers(buffer_peak)
                    continue
                elif kind is REDUCE:
                    collectives.issue(action, self.shards[stage].reduce(action.portion or 1, action.portions or 1))
                    continue
                elif kind is RELEASE:
                    collectives.wait(stage, GATHER, action)
                    self.shards[stage].release()
                    continue
                elif kind is STEP:
                    collectives.wait(stage, REDUCE, action)
                    if stage in self.shards:
                        self.shards[stage].reduced()
                    optimizer = self.optimizers.get(stage)
                    if optimizer is not None:
                        optimizer.step()
                emit((rank, "compute", action, start, clock()))

        mailbox.finish()
        collectives.finish()
        loss_sum = None
        if losses:
            loss_sum = float(torch.stack([loss.detach() for loss in losses.values()]).sum())
        gathered = tuple(outputs[i] for i in sorted(outputs)) if outputs else None
        return RunResult(loss_sum, gathered, tuple(events) + tuple(collectives.events), collectives.exposed,
                         buffer_peak=buffer_peak)

    def _note_buffers(self, peak: dict[str, int]) -> None:
        """Raise ``peak`` (bytes of parameter and gradient buffers per kind) to what the shards hold now."""
        totals: dict[str, int] = {}
        for shard in self.shards.values():
            for kind, size in shard.buffer_bytes().items():
                totals[kind] = totals.get(kind, 0) + size
        for kind, size in totals.items():
            peak[kind] = max(size, peak.get(kind, 0))

    def _note_saved(self, largest: dict[int, int], stage: int, before: int) -> None:
        """Raise ``largest[stage]`` to the activation bytes saved since the meter read ``before``."""
        if self.meter is not None:
            largest[stage] = max(largest.get(stage, 0), self.meter.current - before)

    def _forward(self, stage: int, microbatch: int, arguments: tuple, metas, whole: bool = False) -> tuple:
        """Return the stage's outputs for one micro-batch; ``whole``: as one recomputed region (stores its input only)."""
        produced = recomputed(self.stages[stage], *arguments) if whole else self.stages[stage](*arguments)
        expected = metas[stage]
        if len(produced) != len(expected) or any(
                tuple(t.shape) != meta.shape or t.dtype != meta.dtype for t, meta in zip(produced, expected)):
            found = ", ".join(str(m) for m in metas_of(produced))
            agreed = ", ".join(str(m) for m in expected)
            raise PipelineError(f"rank {self.rank}: stage {stage} produced ({found}) for micro-batch {microbatch}, "
                                f"but the pipeline agreed on ({agreed}) from micro-batch 0 of the first step: "
                                f"every micro-batch must give a stage outputs of the same shapes and dtypes")
        return produced

    def _loss(self, value, target, microbatch: int) -> torch.Tensor:
        target = tuple(t.to(self.device, non_blocking=True) for t in target)
        loss = self.loss_fn(value, target[0] if len(target) == 1 else target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise PipelineError(f"rank {self.rank}: loss_fn returned {type(loss).__name__} "
                                f"{tuple(getattr(loss, 'shape', ()))} for micro-batch {microbatch}: "
                                f"it must return a scalar tensor (the mean loss over the micro-batch)")
        return loss

    def _backward_roots(self, stage, microbatch, stage_outputs, output_grads, losses, scale):
        """Return the tensors to differentiate and their incoming gradients for a stage's backward."""
        if stage == self.last_stage:
            return [losses[microbatch] * scale], None
        produced = stage_outputs[(stage, microbatch)]
        grads = output_grads.pop((stage, microbatch))
        tensors, incoming = [], []
        for tensor, grad in zip((t for t in produced if carries_gradient(t.dtype)), grads):
            if tensor.requires_grad:
                tensors.append(tensor)
                incoming.append(grad)
        return tensors, incoming

    def _deliver_input_grads(self, stage, microbatch, gradients, output_grads, input_grads) -> None:
        if self.placement.stage_ranks[stage - 1] == self.rank:
            output_grads[(stage - 1, microbatch)] = gradients
        else:
            input_grads[(stage, microbatch)] = gradients


def _release(recorded: Recording | None) -> None:
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
