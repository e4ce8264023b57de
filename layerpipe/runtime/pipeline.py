"""``Pipeline``: the user-facing object that splits a model into stages and runs training steps.

Every process builds the same list of layers (same seed) and the same
``Pipeline``; each keeps only the stages its rank holds.  A step splits the
batch into micro-batches, runs this rank's lowered program (the schedule's
data, see ``layerpipe.schedule``) and returns the mean loss on every rank.

``Pipeline`` is a facade: ``assembly`` builds what it is made of, ``runs``
(or ``stream.calls``) runs batches through it with ``batches``,
``shapes`` and ``loss_sharing``, ``state`` reads and writes its state, and
``run_options`` holds the run-level knobs and their rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from ..run_options import RunOptions
from ..schedule.build import Schedule
from ..schedule.config import ScheduleConfig
from ..sim.timeline import Timeline
from .assembly import assemble
from .batches import Tensors
from .launch import init_process_group
from .layout import release_groups
from .materialise import Initialisation
from .measured import measured_timeline, memory_in_last_step, peak_memory_bytes
from .run_state import RunResult
from .schedulers import check_scheduler
from .sharding import weights_gathered
from .stage import layer_list
from .state import PipelineState
from .stream.versions import VersionRecord

__all__ = ["Pipeline", "peak_memory_bytes"]


class Pipeline:
    """A model split into ``ranks × stages_per_rank`` stages, trained with a pipeline schedule on ``data_parallel`` replicas.

    ``layers``: ``list[nn.Module]`` or ``nn.Sequential``, identical on every process.  ``loss_fn(output, target)``
    returns the mean loss over one micro-batch.  ``schedule``: a schedule name, a ``ScheduleConfig``, or a built
    ``Schedule`` whose programs are run as they are.  With a name, the keyword ``options`` are the other fields of
    ``ScheduleConfig`` (``microbatches``, ``stages_per_rank``, ``group_size``, ``placement``, ``data_parallel``,
    ``zero``, ``reduce_portions``, ``reduce_order``, ``weight_buffers``, ``recompute``; see their help there);
    ``ranks`` is always the process count divided by ``data_parallel``.

    ``optimizer``: optional ``callable(params) -> Optimizer``, called once per local stage (with the stage's
    parameters at ``zero=0``, with its flat shard at ``zero`` 1–3).  ``scheduler``: optional ``callable(optimizer) ->
    torch.optim.lr_scheduler.LRScheduler``, called once per stage optimizer (``schedulers`` holds them by stage) and
    stepped exactly when its optimizer steps: not for a step ``skip_nonfinite`` or clipping skipped; async, after
    each of the stage's updates (see ``runtime/schedulers.py``).  ``partition``: ``"parameters"`` (default),
    ``"time"`` (measured on ``sample``, a callable returning one micro-batch input) or the first layer index of
    every stage.  ``track_memory`` counts saved activation bytes (``memory()``).  ``timeout`` bounds every wait, in
    seconds.  ``check_every``: every so many training steps (and at the first) the processes compare a checksum of
    their batch and refuse to train on different ones (0: never).  ``precision``: ``fp32``, ``bf16`` or ``fp16``
    compute in the stages (float32 weights, gradients and optimizer state; ``fp16`` scales the loss dynamically and
    needs ``skip_nonfinite=True``; see ``runtime/precision.py``).  The process group's ``world = pipeline ranks ×
    data_parallel``; see ``layout.Layout`` for which process plays which part.

    Replicas start equal (replica 0's parameters and buffers, as ``DistributedDataParallel``; ``broadcast_buffers``
    gives them its buffers again after every step).  ``eval_step`` and ``forward`` run the layers in evaluation mode,
    ``train_step`` in the mode ``train()``/``eval()`` set (``docs/one-process.md``).  Meta layers are materialised
    only where owned, each by its own rule under a seed of ``(seed, index)``, as ``layerpipe.materialise`` does;
    ``init_from``, a ``save_pretrained`` folder, then loads this process's tensors (``docs/hf.md``).
    ``schedule="async"`` never drains between calls (``flush``, ``docs/async.md``) and needs an ``optimizer``.

    Refuses, with ``ConfigError`` naming the argument, the value and what is valid: an unknown option, async without
    an optimizer, a ``scheduler`` that is not callable, comes without an optimizer, raises or returns no scheduler
    (naming the stage), a process count that is not a multiple of ``data_parallel``, a schedule whose rank count does
    not match, invalid schedule options, a meta layer without an initialisation rule, an ``init_from`` folder whose
    tensors do not fit the layers; with ``PartitionError``, fewer layers than stages.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module] | nn.Sequential,
        loss_fn: Callable,
        schedule: str | ScheduleConfig | Schedule = "breadth-first",
        *,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        partition: str | Sequence[int] = "parameters",
        device: torch.device | str | None = None,
        timeout: float = 300.0,
        sample: Callable[[], object] | None = None,
        track_memory: bool = False,
        check_every: int = 100,
        precision: str = "fp32",
        spatial: int = 1,
        broadcast_buffers: bool = True,
        seed: int = 0,
        init_from: str | None = None,
        **options,
    ):
        run = RunOptions(precision, spatial, timeout, check_every, broadcast_buffers).checked()
        check_scheduler(scheduler, optimizer)
        init_process_group(timeout)
        layers = layer_list(layers)
        weights = Initialisation(seed, init_from)
        parts = assemble(
            layers,
            loss_fn,
            schedule,
            options,
            run,
            optimizer,
            scheduler,
            partition,
            device,
            sample,
            track_memory,
            weights,
        )
        self.check_every, self.precision, self._timeout, self._closed = check_every, precision, timeout, False
        self.training = True  # as a new nn.Module: train_step runs the layers in their own modes
        self.schedule, self.layout, self.groups, self.device = parts.schedule, parts.layout, parts.groups, parts.device
        self.global_rank, self.loss_rank, self.boundaries = parts.global_rank, parts.loss_rank, parts.boundaries
        self.rank = self.layout.pipeline_rank(self.global_rank)
        self.replica = self.layout.replica(self.global_rank)
        self.spatial_index = self.layout.spatial_index(self.global_rank)
        self.microbatches = self.schedule.config.microbatches
        self.stages, self.shards, self.optimizers = parts.stages, parts.shards, parts.optimizers
        self.schedulers = parts.schedulers  # stage -> its optimizer's learning-rate scheduler (with ``scheduler``)
        self.meter, self.executor, self.shapes, self._runs = parts.meter, parts.executor, parts.shapes, parts.runs
        self.tied = parts.tied  # parameters tied across stages (``runtime.ties``)
        self._state = PipelineState(self.stages, self.shards, self.optimizers, timeout, self.global_rank, self.tied)

    # ---------------------------------------------------------------- running
    def train_step(self, inputs: Tensors, targets: Tensors) -> float:
        """Run one training step on the global batch; return its mean loss on every rank.

        Every process passes the same global batch; replica ``d`` trains on
        its ``d``-th contiguous share.  Leaves the gradient of the mean loss
        over the global batch in the local parameters' ``.grad`` (in the
        shard's ``.grad`` from ZeRO-2 on) and applies the optimizer when one
        was given.  Refuses a batch that does not split into equal
        micro-batches with ``ValueError``.

        Or a ``list`` of all ``microbatches × data_parallel`` micro-batches
        (shapes may differ) and a ``list`` of their targets; the loss is the
        mean over counted tokens (``runtime/microbatch_lists.py``, which says
        what it refuses).

        Async: feeds the batch's sub-minibatches into the stream and returns
        without draining; the loss is the mean of their losses, each on the
        weights its forward passed (``docs/async.md``).
        """
        return self._runs.train(inputs, targets)

    def close(self) -> None:
        """Release the process groups the pipeline made, once every process calls it (async: after a ``flush``);
        the pipeline cannot run afterwards.  ``with Pipeline(...) as pipe:`` closes it at the end."""
        if not self._closed:  # a second call (close inside a with block) has nothing left to release
            self.flush()
            release_groups(self.groups, self.executor.ties.process_groups.values())
            self._closed = True

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:  # after an error a peer may never arrive at close's barrier
            self.close()

    def flush(self) -> None:
        """Drain the async stream: run the backwards and updates of every sub-minibatch still in flight.

        Afterwards nothing is in flight and every gradient fed so far is in
        the weights; the next ``train_step`` starts a new stream (with its
        warm-up).  ``eval_step``, ``forward`` and ``gathered_state_dict``
        flush first.  Collective over the pipeline; does nothing for the
        flushed schedules or when nothing is in flight.
        """
        self._runs.flush()

    def eval_step(self, inputs: Tensors, targets: Tensors) -> float:
        """Return the mean loss over the global batch in evaluation mode, without gradients (pipelined, split over replicas).

        Any batch size: the last micro-batch may be smaller (with replicas, the batch splits into equal shares).
        Or lists of micro-batches and targets as ``train_step`` takes them, the loss over their counted tokens.
        Collective over the data-parallel group at ZeRO-3 (the forward programs gather each stage), as is
        ``forward``.  Async: flushes first.
        """
        return self._runs.evaluate(inputs, targets)

    def forward(self, inputs: Tensors):
        """Return the model's output for the whole batch on each replica's last-stage rank (``None`` on the others).

        In evaluation mode; any batch size (the last micro-batch may be smaller); not split over replicas: each
        runs the whole batch.  Async: flushes first.
        """
        return self._runs.forward(inputs)

    __call__ = forward

    def version_records(self) -> list[VersionRecord]:
        """Return, for this rank's stages, which weight version each sub-minibatch met (async; empty otherwise).

        Per stage and sub-minibatch: the version of its forward, of its
        backward and of the update that used its gradient, and the ticks of
        its forward and backward as the rank counted them.
        """
        return self._runs.version_records()

    def weight_versions(self) -> dict[int, int]:
        """Return, per local stage, the most weight versions it held at once (async; empty otherwise)."""
        return self._runs.weight_versions()

    # ---------------------------------------------------------------- state
    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield this process's parameters named as in ``nn.Sequential(*layers)`` (``"3.weight"``).

        At ZeRO-3 each is the part of the parameter this replica stores: a
        flat view of its shard (see ``gathered_state_dict`` for full values).
        """
        return self._state.named_parameters()

    def parameters(self) -> Iterator[torch.Tensor]:
        """Yield this process's parameters (see ``named_parameters``)."""
        for _, parameter in self.named_parameters():
            yield parameter

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Return copies of this rank's stages' full parameters and buffers, named as in ``nn.Sequential(*layers)``.

        Collective over the data-parallel group at ZeRO-3, where weights are
        stored sharded: every replica must call it.  Async: flushes first
        (collective over the pipeline).
        """
        self.flush()
        return self._state.gathered_state_dict()

    state_dict = gathered_state_dict

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full parameter and buffer values named as in ``nn.Sequential(*layers)`` into this rank's stages.

        Every process passes the same values (or at least those of its
        stages); each keeps what its layout stores, so values saved from one
        layout load into another.  Async: flushes first.  Refuses, with
        ``KeyError`` naming it, a value this rank's stages need and ``state`` lacks,
        and with ``ValueError`` two names of one tied parameter given different values.
        """
        self.flush()
        self._state.load_state_dict(state)

    def optimizer_state_dict(self) -> dict:
        """Return this rank's optimizer state per parameter, layout-independent (collective at ZeRO 1–3).

        ``{"state": {name: {key: tensor shaped like the parameter, or a
        scalar}}, "hyperparameters": {name: {option: value}}}``, parameters
        named as in ``nn.Sequential(*layers)``: the sharded state of ZeRO 1–3
        is gathered and cut into the parameters, so it loads into any layout.
        """
        self.flush()
        return self._state.optimizer_state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Load what ``optimizer_state_dict`` returned (on this or another layout) into this rank's optimizers."""
        self.flush()
        self._state.load_optimizer_state_dict(state)

    def train(self, mode: bool = True) -> Pipeline:
        """Set the local stages to training (or evaluation) mode, in which ``train_step`` runs them; return the pipeline.

        ``eval_step`` and ``forward`` always run in evaluation mode and leave the mode as it was.
        """
        self.training = mode
        for stage in self.stages.values():
            stage.train(mode)
        return self

    def eval(self) -> Pipeline:
        """Set the local stages to evaluation mode; return the pipeline."""
        return self.train(False)

    # ---------------------------------------------------------------- what the last run did
    def memory(self) -> dict[str, int | None]:
        """Return this process's memory in the last training step, in bytes.

        ``activations``: peak bytes of tensors saved for backward (``None``
        unless ``track_memory``); ``parameters`` and ``gradients``: peak of
        the stage buffers (full and shard); ``optimizer``: optimizer state;
        ``forward_activations``: per local stage, what one forward saved;
        ``recomputed_activations``: per recomputed stage, what one ``R`` added.
        """
        return memory_in_last_step(self._runs.last_training, self.optimizers, self.executor)

    def timeline(self, title: str = "") -> Timeline:
        """Return the measured timeline of this replica's last step, gathered from its pipeline ranks (collective).

        Times are seconds from the earliest start on any rank.  Async: the
        last call's slice, with the version records of its sub-minibatches
        in ``metadata["version_records"]``.
        """
        records = self._runs.last_call_records()
        return measured_timeline(self.last_result, records, self._runs.streams, self, title)

    def boundary_metas(self) -> tuple:
        """Return every stage's output metas agreed for the first batch's shapes (``LookupError`` before any run)."""
        return self.shapes.first()

    def weights_gathered(self, purpose: str) -> AbstractContextManager:
        """Return a context that holds every local stage's full weights inside it (collective over the replicas at
        ZeRO-3, which gather their stages in the same order); ``purpose`` ends the report of a gather that waits."""
        return weights_gathered(self.shards.values(), self._timeout, self.global_rank, purpose)

    @property
    def last_result(self) -> RunResult | None:
        """Return what the last run did on this rank (training, evaluation or forward; ``None`` before any)."""
        return self._runs.last_result

    @property
    def loss_scale(self) -> float | None:
        """Return the current dynamic loss scale of float16 training (``None`` in the other precisions)."""
        return self.executor.scaler.scale if self.executor.scaler is not None else None

    @property
    def last_step_skipped(self) -> int | None:
        """Return, when ``skip_nonfinite`` skipped the last step on every rank, the first stage whose gradients were
        not finite (on any process); ``None`` when it stepped."""
        last = self._runs.last_training
        return last.skipped if last is not None else None

    @property
    def last_grad_norm(self) -> float | None:
        """Return the global gradient norm of the last training step before clipping (``clip_grad_norm``), as
        ``torch.nn.utils.clip_grad_norm_`` on the whole model returns it; equal on every process; ``None`` without
        clipping."""
        last = self._runs.last_training
        return last.grad_norm if last is not None else None

    @property
    def last_exposed_communication(self) -> float:
        """Return the seconds the last run waited for data-parallel collectives."""
        return self.last_result.exposed_data_parallel if self.last_result is not None else 0.0
