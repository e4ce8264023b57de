"""``Pipeline``: the user-facing object that splits a model into stages and runs training steps.

Every process builds the same list of layers (same seed) and the same
``Pipeline``; each keeps only the stages its rank holds.  A step splits the
batch into micro-batches, runs this rank's lowered program (the schedule's
data, see ``layerpipe.schedule``) and returns the mean loss on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..knobs import knobs
from ..ops.spatial import gather_bounds
from ..run_options import RunOptions
from ..schedule.actions import parse_action
from ..schedule.build import Schedule, build_schedule, stream_programs
from ..schedule.config import ConfigError, ScheduleConfig, pipeline_ranks
from ..sim.timeline import Timeline, TimelineEvent
from .context import RankContext
from .exchange import all_gather_json
from .executor import Executor, LocalStage, RunResult
from .launch import init_process_group
from .layout import Layout, make_groups
from .memory import ActivationMeter, optimizer_state_bytes
from .p2p import Mailbox, wait_for
from .partition import partition as split_layers
from .recompute import mark_regions
from .sharding import StageShard
from .spatial_split import ChunkLoss, gather_rows, hand_group, has_spatial_layers, rows_of
from .stage import PipelineError, Stage, as_tuple
from .stream import StreamExecutor
from .tags import LOSS_TAG, claim_message_tags
from .versions import VersionRecord, WeightVersions

Tensors = torch.Tensor | Sequence[torch.Tensor]


class Pipeline:
    """A model split into ``ranks × stages_per_rank`` stages, trained with a pipeline schedule on ``data_parallel`` replicas.

    ``layers``: ``list[nn.Module]`` or ``nn.Sequential``, identical on every
    process.  ``loss_fn(output, target)`` returns the mean loss over one
    micro-batch.  ``schedule``: a schedule name, a ``ScheduleConfig``, or a
    built ``Schedule`` whose programs are run as they are.  With a name, the
    keyword ``options`` are the other fields of ``ScheduleConfig``
    (``microbatches``, ``stages_per_rank``, ``group_size``, ``placement``,
    ``data_parallel``, ``zero``, ``reduce_portions``, ``reduce_order``,
    ``weight_buffers``, ``recompute``; see their help there); ``ranks`` is
    always the process count divided by ``data_parallel``.

    ``optimizer``: optional ``callable(params) -> Optimizer``, called once
    per local stage (with the stage's parameters at ``zero=0``, with its
    flat shard at ``zero`` 1–3).  ``partition``: ``"parameters"`` (default),
    ``"time"`` (measured on ``sample``, a callable returning one micro-batch
    input) or the first layer index of every stage.  ``track_memory`` counts
    saved activation bytes (``memory()``).  ``timeout`` bounds every wait,
    in seconds.  ``check_every``: every so many training steps (and at the
    first) the processes compare a checksum of their batch and refuse to
    train on different ones (0: never).  ``precision``: ``fp32``, ``bf16`` or
    ``fp16`` compute in the stages (float32 weights, gradients and optimizer
    state; ``fp16`` scales the loss dynamically and needs
    ``skip_nonfinite=True``; see ``runtime/precision.py``).  The process group's ``world = pipeline ranks ×
    data_parallel``; see ``layout.Layout`` for which process plays which part.

    ``schedule="async"`` (pipelined backpropagation) never drains between
    calls: ``train_step`` feeds ``microbatches`` sub-minibatches and returns
    while the last of them are still in flight; each stage updates on its
    own after every ``update_every`` of its backwards, with the weights
    ``weight_policy`` chooses and the ``delay_correction`` asked for (see
    ``flush`` and ``docs/async.md``).  It needs an ``optimizer``.

    Refuses, with ``ConfigError`` naming the argument, the value and what is
    valid: an unknown option, async without an optimizer, a process count that is not a multiple of
    ``data_parallel``, a schedule whose rank count does not match, invalid
    schedule options; with ``PartitionError``, fewer layers than stages.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module] | nn.Sequential,
        loss_fn: Callable,
        schedule: str | ScheduleConfig | Schedule = "breadth-first",
        *,
        optimizer: Callable | None = None,
        partition: str | Sequence[int] = "parameters",
        device: torch.device | str | None = None,
        timeout: float = 300.0,
        sample: Callable[[], object] | None = None,
        track_memory: bool = False,
        check_every: int = 100,
        precision: str = "fp32",
        spatial: int = 1,
        **options,
    ):
        run = RunOptions(precision, spatial, timeout, check_every).checked()
        init_process_group(timeout)
        self.check_every, self._calls, self.precision = check_every, 0, precision
        layers = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
        spatial_layers = _check_spatial(spatial, layers)
        self.schedule = _schedule_for(schedule, options, dist.get_world_size() // spatial, run)
        config = self.schedule.config
        self.layout = Layout(config.ranks, config.data_parallel, spatial)
        self.global_rank = dist.get_rank()
        self.rank = self.layout.pipeline_rank(self.global_rank)
        self.replica = self.layout.replica(self.global_rank)
        self.spatial_index = self.layout.spatial_index(self.global_rank)
        placement = self.schedule.placement
        self.groups = make_groups(self.layout, self.global_rank, placement.loss_rank, spatial_layers)
        self.microbatches = config.microbatches
        self.device = torch.device(device) if device is not None else _default_device()
        self.boundaries = split_layers(layers, placement.stages, partition, sample)
        self.stages = {
            stage: Stage(stage, first, layers[first:end]).to(self.device)
            for stage, (first, end) in enumerate(self.boundaries)
            if placement.rank_of(stage) == self.rank
        }
        hand_group(self.stages.values(), self.groups.spatial)
        self._chunk_loss = ChunkLoss(loss_fn) if spatial > 1 else None
        loss_fn = self._chunk_loss or loss_fn
        self._target_rows: dict[tuple, tuple[int, int, int]] = {}
        for stage in self.stages.values():
            mark_regions(stage)  # submodules marked recompute_region become regions for recompute="selective"
        self.shards = {
            index: StageShard(stage, config.zero, config.data_parallel, self.replica, self.groups.data, self.device)
            for index, stage in self.stages.items()
        }
        if config.schedule == "async" and optimizer is None:
            raise ConfigError(
                "optimizer",
                None,
                "async updates every stage inside the stream: give optimizer=callable(params) -> Optimizer",
            )
        self.optimizers = {
            index: optimizer(shard.optimized)
            for index, shard in self.shards.items()
            if optimizer is not None and shard.optimized
        }
        # A function of the shards, not a bound method: the meter must not keep the pipeline (and its groups) alive.
        self.meter = ActivationMeter(functools.partial(_weight_pointers, self.shards)) if track_memory else None
        # NCCL runs a pair's operations in issue order, so nothing is received ahead of the program there.
        lookahead = 0 if dist.get_backend() == "nccl" else 2
        self._early_loss_receive = lookahead > 0
        self._timeout = timeout
        members = self.layout.pipeline_members(self.replica, self.spatial_index)
        self.streaming = config.schedule == "async"
        self.executor = self._make_executor(members, lookahead, loss_fn)
        self._stream_start = self._fed = 0  # async: where the stream in flight began, and the next sub-minibatch
        self.loss_rank = members[placement.loss_rank]
        self._metas: dict[tuple, tuple] = {}
        self.last_result: RunResult | None = None  # of the last run: training, evaluation or forward
        self._last_training: RunResult | None = None

    def _make_executor(self, members: tuple[int, ...], lookahead: int, loss_fn: Callable) -> Executor:
        """Return the interpreter of this rank's programs: the executor, or the async stream's."""
        config, placement = self.schedule.config, self.schedule.placement
        update_every = config.update_every if self.streaming else None
        context = RankContext(
            self.rank,
            placement,
            self.microbatches,
            members,
            self.device,
            self._timeout,
            lookahead,
            config.data_parallel,
            update_every,
            precision=self.precision,
            downward=self.groups.downward,
        )
        context = dataclasses.replace(context, tag_offset=claim_message_tags(placement.stages, context.tag_window))
        modes = config.recompute_modes
        local = {
            index: LocalStage(stage, self.shards[index], self.optimizers.get(index), modes[index])
            for index, stage in self.stages.items()
        }
        if not self.streaming:
            return Executor(context, local, loss_fn, self.meter, self.groups.pipeline)
        versions = {
            index: WeightVersions(
                index,
                stage,
                self.optimizers.get(index),
                config.weight_policy,
                config.delay_correction,
                2 * (placement.stages - 1 - index),
                config.update_every,
                config.delay_warmup,
            )
            for index, stage in self.stages.items()
        }
        return StreamExecutor(context, local, loss_fn, self.meter, versions, self.groups.pipeline)

    # ---------------------------------------------------------------- public surface
    def train_step(self, inputs: Tensors, targets: Tensors) -> float:
        """Run one training step on the global batch; return its mean loss on every rank.

        Every process passes the same global batch; replica ``d`` trains on
        its ``d``-th contiguous share.  Leaves the gradient of the mean loss
        over the global batch in the local parameters' ``.grad`` (in the
        shard's ``.grad`` from ZeRO-2 on) and applies the optimizer when one
        was given.  Refuses a batch that does not split into equal
        micro-batches with ``ValueError``.

        Async: feeds the batch's ``microbatches`` sub-minibatches into the
        stream and returns without draining; the gradients live inside the
        stream (each stage's are zeroed after its update).  The loss returned
        is the mean over this call's sub-minibatches, each computed by its
        forward on the weights every stage held when it passed.
        """
        if self.streaming:
            return self._feed(inputs, targets)
        for shard in self.shards.values():
            shard.begin_step()
        posted = self._post_loss_receive() if self._early_loss_receive else None
        result = self._run("train", self.schedule.programs, inputs, targets)
        self._last_training = result
        return self._share_loss(result, posted)

    def _feed(self, inputs: Tensors, targets: Tensors) -> float:
        """Run one async call: the slice of the stream that feeds this batch; return its sub-minibatches' mean loss."""
        programs = stream_programs(self.schedule, self._stream_start, self._fed, self.microbatches, drain=False)
        posted = self._post_loss_receive() if self._early_loss_receive else None
        result = self._run("train", programs, inputs, targets, stream_first=self._fed)
        self._fed += self.microbatches
        self._last_training = result
        return self._share_loss(result, posted)

    def flush(self) -> None:
        """Drain the async stream: run the backwards and updates of every sub-minibatch still in flight.

        Afterwards nothing is in flight and every gradient fed so far is in
        the weights; the next ``train_step`` starts a new stream (with its
        warm-up).  ``eval_step``, ``forward`` and ``gathered_state_dict``
        flush first.  Collective over the pipeline; does nothing for the
        flushed schedules or when nothing is in flight.
        """
        if not self.streaming or self._fed == self._stream_start:
            return
        programs = stream_programs(self.schedule, self._stream_start, self._fed, 0, drain=True)
        mailbox = Mailbox(self.executor.context, programs, self._stream_metas, by_receives=True)
        # Not ``last_result``: the timeline shows the last call, and a drain is no call.
        self.executor.drain(programs[self.rank], mailbox, self._stream_metas, self._fed - self._stream_start)
        self._stream_start = self._fed

    def version_records(self) -> list[VersionRecord]:
        """Return, for this rank's stages, which weight version each sub-minibatch met (async; empty otherwise).

        Per stage and sub-minibatch: the version of its forward, of its
        backward and of the update that used its gradient, and the ticks of
        its forward and backward as the rank counted them.
        """
        return self.executor.records if self.streaming else []

    def weight_versions(self) -> dict[int, int]:
        """Return, per local stage, the most weight versions it held at once (async; empty otherwise)."""
        if not self.streaming:
            return {}
        return {index: versions.held_versions for index, versions in self.executor.versions.items()}

    def eval_step(self, inputs: Tensors, targets: Tensors) -> float:
        """Return the mean loss over the global batch without gradients (forward only, pipelined, split over replicas).

        Collective over the data-parallel group at ZeRO-3 (the forward programs gather each stage), as is
        ``forward``.  Async: flushes first.
        """
        self.flush()
        posted = self._post_loss_receive() if self._early_loss_receive else None
        result = self._run("eval", self.schedule.forward, inputs, targets)
        return self._share_loss(result, posted)

    def forward(self, inputs: Tensors):
        """Return the model's output for the whole batch on each replica's last-stage rank (``None`` on the others).

        Inference is not split over replicas: each runs the whole batch.  Async: flushes first.
        """
        self.flush()
        result = self._run("forward", self.schedule.forward, inputs, None, split=False)
        if result.outputs is None:
            return None
        joined = tuple(torch.cat(parts) for parts in zip(*result.outputs))
        if self.layout.spatial > 1:  # the whole images, from every chunk's rows
            joined = tuple(gather_rows(t, self.groups.spatial) if t.dim() >= 3 else t for t in joined)
        return joined[0] if len(joined) == 1 else joined

    __call__ = forward

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield this process's parameters named as in ``nn.Sequential(*layers)`` (``"3.weight"``).

        At ZeRO-3 each is the part of the parameter this replica stores: a
        flat view of its shard (see ``gathered_state_dict`` for full values).
        """
        for index in sorted(self.shards):
            yield from self.shards[index].local_parameters()

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
        state = {}
        for index in sorted(self.stages):
            stage = self.stages[index]
            full = self.shards[index].full_parameters(self._timeout, self.global_rank)
            for offset, layer in enumerate(stage.layers):
                prefix = f"{stage.first + offset}."
                for name, tensor in layer.named_buffers():
                    state[prefix + name] = tensor.detach().clone()
                for name, parameter in layer.named_parameters():
                    state[prefix + name] = full.get(prefix + name, parameter.detach())
        return state

    state_dict = gathered_state_dict

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full parameter and buffer values named as in ``nn.Sequential(*layers)`` into this rank's stages.

        Every process passes the same values (or at least those of its
        stages); each keeps what its layout stores, so values saved from one
        layout load into another.  Async: flushes first.  Refuses, with
        ``KeyError`` naming it, a value this rank's stages need and ``state`` lacks.
        """
        self.flush()
        for index in sorted(self.stages):
            stage, shard = self.stages[index], self.shards[index]
            missing = [name for name in shard.names if name not in state]
            if missing:
                raise KeyError(f"the state has no value for {missing[0]} (stage {index})")
            shard.load_parameters({name: state[name] for name in shard.names})
            with torch.no_grad():
                for offset, layer in enumerate(stage.layers):
                    for name, tensor in layer.named_buffers():
                        key = f"{stage.first + offset}.{name}"
                        if key in state:
                            tensor.copy_(state[key])

    def optimizer_state_dict(self) -> dict:
        """Return this rank's optimizer state per parameter, layout-independent (collective at ZeRO 1–3).

        ``{"state": {name: {key: tensor shaped like the parameter, or a
        scalar}}, "hyperparameters": {name: {option: value}}}``, parameters
        named as in ``nn.Sequential(*layers)``: the sharded state of ZeRO 1–3
        is gathered and cut into the parameters, so it loads into any layout.
        """
        self.flush()
        state, hyperparameters = {}, {}
        for index, optimizer in sorted(self.optimizers.items()):
            shard = self.shards[index]
            state.update(shard.full_optimizer_state(optimizer, self._timeout, self.global_rank))
            group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
            hyperparameters.update({name: dict(group) for name in shard.names})
        return {"state": state, "hyperparameters": hyperparameters}

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Load what ``optimizer_state_dict`` returned (on this or another layout) into this rank's optimizers."""
        self.flush()
        for index, optimizer in sorted(self.optimizers.items()):
            shard = self.shards[index]
            shard.load_optimizer_state(optimizer, state["state"])
            options = state.get("hyperparameters", {}).get(shard.names[0]) if shard.names else None
            for group in optimizer.param_groups:
                group.update({key: value for key, value in (options or {}).items() if key in group})

    def memory(self) -> dict[str, int | None]:
        """Return this process's memory in the last training step, in bytes.

        ``activations``: peak bytes of tensors saved for backward (``None``
        unless ``track_memory``); ``parameters`` and ``gradients``: peak of
        the stage buffers (full and shard); ``optimizer``: optimizer state;
        ``forward_activations``: per local stage, what one forward saved;
        ``recomputed_activations``: per recomputed stage, what one ``R`` added.
        """
        last = self._last_training
        peak = last.buffer_peak if last is not None else {}
        return {
            "activations": last.peak_activation_bytes if last is not None else None,
            "parameters": peak.get("parameters", 0),
            "gradients": peak.get("gradients", 0),
            "optimizer": optimizer_state_bytes(self.optimizers.values()),
            "forward_activations": dict(self.executor.forward_bytes),
            "recomputed_activations": dict(self.executor.recompute_bytes),
        }

    def train(self, mode: bool = True) -> Pipeline:
        """Set the local stages to training (or evaluation) mode; return the pipeline."""
        for stage in self.stages.values():
            stage.train(mode)
        return self

    def eval(self) -> Pipeline:
        """Set the local stages to evaluation mode; return the pipeline."""
        return self.train(False)

    def timeline(self, title: str = "") -> Timeline:
        """Return the measured timeline of this replica's last step, gathered from its pipeline ranks (collective).

        Times are seconds from the earliest start on any rank.  Async: the
        last call's slice, with the version records of its sub-minibatches
        in ``metadata["version_records"]``.
        """
        events = list(self.last_result.events) if self.last_result is not None else []
        records = self._last_call_records()
        if self.layout.pipeline > 1:
            mine = {
                "events": [[r, stream, str(action), start, end] for r, stream, action, start, end in events],
                "records": [dataclasses.astuple(record) for record in records],
            }
            gathered = all_gather_json(mine, self.groups.pipeline, self.device)
            events = [
                (r, stream, parse_action(action), start, end)
                for part in gathered
                for r, stream, action, start, end in part["events"]
            ]
            records = sorted(VersionRecord(*fields) for part in gathered for fields in part["records"])
        metadata = {"config": self.schedule.config.to_json()}
        if self.streaming:
            metadata["version_records"] = [dataclasses.asdict(record) for record in records]
        origin = min((event[3] for event in events), default=0.0)
        rows = tuple(
            sorted(
                (
                    TimelineEvent(r, stream, action, start - origin, end - origin)
                    for r, stream, action, start, end in events
                ),
                key=lambda row: (row[0], row[3]),
            )
        )
        return Timeline(
            self.schedule.config.ranks, rows, "measured", "s", title or self.schedule.config.schedule, metadata
        )

    def _last_call_records(self) -> list[VersionRecord]:
        """Return this rank's version records of the sub-minibatches the last async call ran a forward or backward of."""
        if not self.streaming:
            return []
        low = self._fed - self.microbatches - 2 * (self.schedule.placement.stages - 1)
        return [record for record in self.version_records() if record.microbatch >= low]

    # ---------------------------------------------------------------- internals
    def _run(
        self,
        mode: str,
        programs,
        inputs: Tensors,
        targets: Tensors | None,
        split: bool = True,
        stream_first: int | None = None,
    ) -> RunResult:
        """Run this rank's program of ``programs`` on the batch; ``stream_first``: the async call's first sub-minibatch."""
        replicas = self.layout.data_parallel if split else 1
        replica = self.replica if split else 0
        if targets is not None:
            _check_same_batch(inputs, targets)
        if mode == "train" and self.check_every and self._calls % self.check_every == 0:
            self._check_same_batch_everywhere(inputs)
        self._calls += mode == "train"
        input_parts = _split(inputs, self.microbatches, "inputs", replicas, replica)
        target_parts = _split(targets, self.microbatches, "targets", replicas, replica) if targets is not None else None
        if stream_first is not None:
            return self._run_stream_call(programs, input_parts, target_parts, stream_first)
        # The whole images' shapes, not this band's: two heights can give one band the same rows, and the
        # bands must agree (and gather) together.
        signature = tuple((tuple(t.shape), t.dtype) for t in input_parts[0])
        if self.layout.spatial > 1:
            input_parts = [rows_of(part, self.layout.spatial, self.spatial_index) for part in input_parts]
        metas = self._agreed_metas(input_parts[0], signature)
        if self.layout.spatial > 1 and target_parts is not None:
            target_parts = self._target_chunks(signature, metas, target_parts)
        mailbox = self.executor.mailbox((mode != "train", signature), programs, metas)
        result = self.executor.run(
            programs[self.rank], mailbox, metas, input_parts, target_parts, training=mode == "train"
        )
        self.last_result = result
        return result

    def _target_chunks(self, signature: tuple, metas: tuple, target_parts: list) -> list:
        """Return the targets' rows that this chunk's last-stage outputs stand for; weight its loss by their share."""
        rows = self._target_rows.get(signature)
        if rows is None:
            bounds = gather_bounds(metas[-1][0].shape[-2], self.groups.spatial)
            rows = self._target_rows[signature] = (*bounds[self.spatial_index], bounds[-1][1])
        first, end, total = rows
        for target in target_parts[0]:
            if target.dim() < 3 or target.shape[-2] != total:
                raise ValueError(
                    f"targets: with spatial={self.layout.spatial} every target must be images whose "
                    f"rows match the output's {total} (second-to-last dimension); a micro-batch's "
                    f"target has shape {tuple(target.shape)}"
                )
        self._chunk_loss.weight = (end - first) / total
        return [tuple(t[..., first:end, :] for t in part) for part in target_parts]

    def _check_same_batch_everywhere(self, inputs: Tensors) -> None:
        """Refuse, with ``PipelineError``, processes handed different global batches (a checksum, all-reduced)."""
        if dist.get_world_size() == 1:
            return
        total = sum(
            float(t.detach().double().sum()) + float(t.numel())
            for t in as_tuple(inputs if isinstance(inputs, torch.Tensor) else tuple(inputs))
        )
        found = torch.tensor([total, -total], dtype=torch.float64, device=self.device)
        work = dist.all_reduce(found, op=dist.ReduceOp.MAX, async_op=True)
        wait_for(work, self._timeout, self.global_rank, "comparing the batch's checksum with the other processes")
        if found[0] != -found[1]:
            raise PipelineError(
                f"process {self.global_rank}: the processes were handed different batches "
                f"(input checksums from {-float(found[1]):.6g} to {float(found[0]):.6g}); every "
                f"process must pass the same global batch to train_step"
            )

    def _run_stream_call(self, programs, input_parts, target_parts, first: int) -> RunResult:
        """Run one async call's slice, the sub-minibatches numbered on from ``first`` across calls."""
        metas = self._agreed_metas(input_parts[0])
        if self._fed != self._stream_start and metas != self._stream_metas:
            raise ValueError("inputs of another shape or dtype than the sub-minibatches in flight: flush() first")
        self._stream_metas = metas
        mailbox = Mailbox(self.executor.context, programs, metas, by_receives=True)
        numbered = {first + index: part for index, part in enumerate(input_parts)}
        targets = {first + index: part for index, part in enumerate(target_parts)}
        result = self.executor.run(programs[self.rank], mailbox, metas, numbered, targets, training=True)
        self.last_result = result
        return result

    def _agreed_metas(self, first_microbatch: tuple, signature: tuple | None = None) -> tuple:
        """Return every stage's output metas for inputs shaped like ``first_microbatch`` (agreed on first use).

        ``signature`` keys the agreement (the micro-batch's shapes by default).
        """
        signature = signature or tuple((tuple(t.shape), t.dtype) for t in first_microbatch)
        metas = self._metas.get(signature)
        if metas is None:
            with self._all_gathered():
                metas = self.executor.agree(first_microbatch)
            self._metas[signature] = metas
        return metas

    @contextmanager
    def _all_gathered(self):
        """Hold every local stage's full weights inside the block (to agree the boundary shapes, before any program runs).

        Collective over the data-parallel group at ZeRO-3, where weights are stored sharded.
        """
        released = [shard for shard in self.shards.values() if not shard.gathered]
        for shard in released:
            wait_for(
                shard.gather(),
                self._timeout,
                self.global_rank,
                f"gathering stage {shard.stage_index}'s weights to agree the boundary shapes",
            )
        try:
            yield
        finally:
            for shard in released:
                shard.release()

    @property
    def loss_scale(self) -> float | None:
        """Return the current dynamic loss scale of float16 training (``None`` in the other precisions)."""
        return self.executor.scaler.scale if self.executor.scaler is not None else None

    @property
    def last_step_skipped(self) -> int | None:
        """Return, when ``skip_nonfinite`` skipped the last step on every rank, the first stage whose gradients were
        not finite (on any process); ``None`` when it stepped."""
        return self._last_training.skipped if self._last_training is not None else None

    @property
    def last_exposed_communication(self) -> float:
        """Return the seconds the last run waited for data-parallel collectives."""
        return self.last_result.exposed_data_parallel if self.last_result is not None else 0.0

    def _post_loss_receive(self):
        """Post the receive of the step's mean loss from the last stage's rank (gloo: before the program runs)."""
        if self.global_rank == self.loss_rank:
            return None
        buffer = torch.zeros(1, dtype=torch.float64, device=self.device)
        group = self.executor.context.group_of(self.schedule.placement.loss_rank, self.rank)
        return buffer, dist.irecv(buffer, src=self.loss_rank, tag=LOSS_TAG, group=group)

    def _share_loss(self, result: RunResult, posted) -> float:
        """Return the step's mean loss: averaged over the replicas' last-stage ranks, sent point-to-point to the others.

        A receive posted before the program runs costs the other ranks
        nothing, where a broadcast would hold every rank at the end of the step.
        """
        if self.global_rank == self.loss_rank:
            value = torch.full((1,), result.loss_sum / self.microbatches, dtype=torch.float64, device=self.device)
            if self.groups.loss is not None:
                work = dist.all_reduce(value, group=self.groups.loss, async_op=True)
                wait_for(work, self._timeout, self.global_rank, "averaging the step's loss over the replicas")
                value /= self.layout.data_parallel
            members, context = self.layout.pipeline_members(self.replica, self.spatial_index), self.executor.context
            works = [
                dist.isend(value, dst=peer, tag=LOSS_TAG, group=context.group_of(self.rank, pipeline_rank))
                for pipeline_rank, peer in enumerate(members)
                if peer != self.global_rank
            ]
            for work in works:
                wait_for(work, self._timeout, self.global_rank, "sending the step's loss to the other ranks")
            return self._summed_over_chunks(value)
        buffer, work = posted if posted is not None else self._post_loss_receive()
        wait_for(work, self._timeout, self.global_rank, f"waiting for the step's loss from rank {self.loss_rank}")
        return self._summed_over_chunks(buffer)

    def _summed_over_chunks(self, loss: torch.Tensor) -> float:
        """Return the whole images' loss: the sum of the chunks' weighted losses (the loss itself without chunks)."""
        if self.layout.spatial > 1:
            work = dist.all_reduce(loss, group=self.groups.spatial, async_op=True)
            wait_for(work, self._timeout, self.global_rank, "summing the step's loss over the spatial chunks")
        return float(loss.item())


def _check_spatial(spatial: object, layers: list) -> bool:
    """Refuse, with ``ConfigError`` on ``spatial``, a chunk count the model or the process count cannot take;
    return whether the model has spatial layers."""
    world, found = dist.get_world_size(), has_spatial_layers(layers)
    if world % spatial:
        raise ConfigError(
            "spatial", spatial, f"must divide the {world} processes (pipeline ranks × data_parallel × spatial)"
        )
    if spatial > 1 and not found:
        raise ConfigError(
            "spatial",
            spatial,
            "the model has no spatial layers (layerpipe.ops.SpatialConv2d, "
            "SpatialConvTranspose2d, SpatialGroupNorm, SpatialBlock) to run on chunks of its images",
        )
    return found


def _check_same_batch(inputs: Tensors, targets: Tensors) -> None:
    """Refuse, with ``ValueError`` naming ``targets``, targets whose batch size differs from the inputs'."""
    first_input = as_tuple(inputs if isinstance(inputs, torch.Tensor) else tuple(inputs))[0]
    for target in as_tuple(targets if isinstance(targets, torch.Tensor) else tuple(targets)):
        if target.dim() == 0 or first_input.dim() == 0 or target.shape[0] != first_input.shape[0]:
            raise ValueError(
                f"targets: a batch of {target.shape[0] if target.dim() else 0} samples, but the inputs "
                f"have {first_input.shape[0] if first_input.dim() else 0}: give one target per sample"
            )


def _split(
    batch: Tensors, microbatches: int, name: str, replicas: int = 1, replica: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """Return replica ``replica``'s contiguous share of the batch as ``microbatches`` equal micro-batches."""
    tensors = as_tuple(batch if isinstance(batch, torch.Tensor) else tuple(batch))
    size = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
    parts = microbatches * replicas
    if size == 0 or size % parts or any(t.shape[0] != size for t in tensors):
        across = f"data_parallel={replicas} × " if replicas > 1 else ""
        raise ValueError(
            f"{name} batch of {size} samples: must split into {across}microbatches={microbatches} "
            f"equal micro-batches (a multiple of {parts} along the first dimension)"
        )
    share = size // replicas
    tensors = tuple(t[replica * share : (replica + 1) * share] for t in tensors)
    return list(zip(*(t.chunk(microbatches) for t in tensors)))


def _schedule_for(schedule: str | ScheduleConfig | Schedule, options: dict, world: int, run: RunOptions) -> Schedule:
    """Return the built schedule ``Pipeline`` runs on ``world`` processes: as given, or from a config or a name and options.

    Refuses, with ``ConfigError``, options beside a built schedule or a
    config, unknown options, run options the schedule cannot run with
    (before the schedule's own rules, so that each refusal is one line
    whatever else is set), and a schedule whose ranks × data_parallel is
    not ``world``.
    """
    names = [field.name for field in knobs(ScheduleConfig) if field.name not in ("schedule", "ranks")]
    if isinstance(schedule, (Schedule, ScheduleConfig)) and options:
        raise ConfigError(
            next(iter(options)),
            next(iter(options.values())),
            f"give it inside the {type(schedule).__name__}, not beside it",
        )
    for name, value in options.items():
        if name not in names:
            raise ConfigError(name, value, f"not an option of Pipeline; the schedule options are {', '.join(names)}")
    if isinstance(schedule, str):
        schedule = ScheduleConfig(schedule, ranks=pipeline_ranks(world, options.get("data_parallel", 1)), **options)
    config = schedule.config if isinstance(schedule, Schedule) else schedule
    run.check_schedule(config.schedule == "async", config.skip_nonfinite)
    if isinstance(schedule, ScheduleConfig):
        schedule = build_schedule(schedule)
    config = schedule.config
    if config.ranks * config.data_parallel != world:
        raise ConfigError(
            "schedule",
            f"{config.ranks} ranks × data_parallel={config.data_parallel}",
            f"the process group has {world} processes (start pipeline ranks × data_parallel processes)",
        )
    return schedule


def _weight_pointers(shards: dict) -> list[int]:
    """Return where the stages' flat weight buffers live (saved tensors there are weights, not activations)."""
    return [shard.flat.untyped_storage().data_ptr() for shard in shards.values()]


def _default_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory_bytes(device: torch.device) -> int:
    """Return this process's peak memory: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
