"""Assembly: what a ``Pipeline`` is made of on this process, built once from its arguments.

The schedule (built from a name, a config or given built), the process
layout and groups, this rank's stages (holding replica 0's values, see
``replicas``) with their shards and optimizers, the
executor that runs its programs (the async stream's own when the schedule
streams), and the collaborators that run batches through it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..knobs import knobs
from ..run_options import RunOptions
from ..schedule.build import Schedule, build_schedule
from ..schedule.config import ConfigError, ScheduleConfig, pipeline_ranks
from .batches import Batches
from .context import RankContext
from .executor import Executor
from .layout import Layout, make_groups
from .loss_sharing import LossSharing
from .materialise import Initialisation
from .memory import ActivationMeter
from .partition import partition as split_layers
from .recompute import mark_regions
from .replicas import LocalModel, ReplicaBuffers, start_replicas_equal
from .run_state import LocalStage
from .runs import FlushedRuns
from .schedulers import build_schedulers
from .shapes import BoundaryShapes, ShapeAgreement
from .sharding import StageShard
from .spatial_split import ChunkLoss, hand_group, has_spatial_layers
from .stage import Stage
from .stream.calls import AsyncStream
from .stream.executor import StreamExecutor
from .stream.versions import WeightVersions, stage_delay
from .tags import claim_message_tags
from .ties import LocalTies, TiedParameter, find_tied, tie_groups, uncounted_names, untie_local


@dataclasses.dataclass
class Assembly:
    """This process's part of a pipeline: who it is, what it holds, and what runs batches through it."""

    schedule: Schedule
    layout: Layout
    global_rank: int
    groups: object
    device: torch.device
    boundaries: list
    stages: dict[int, Stage]
    shards: dict[int, StageShard]
    optimizers: dict[int, torch.optim.Optimizer]
    meter: ActivationMeter | None
    executor: Executor
    loss_rank: int
    shapes: BoundaryShapes
    runs: FlushedRuns
    schedulers: dict[int, torch.optim.lr_scheduler.LRScheduler]
    tied: tuple[TiedParameter, ...]


def assemble(
    layers: list[nn.Module],
    loss_fn: Callable,
    schedule: str | ScheduleConfig | Schedule,
    options: dict,
    run: RunOptions,
    optimizer: Callable | None,
    scheduler: Callable | None,
    partition: str | Sequence[int],
    device: torch.device | str | None,
    sample: Callable[[], object] | None,
    track_memory: bool,
    initialisation: Initialisation,
) -> Assembly:
    """Return this process's part of the pipeline (the process group is up); refuse bad arguments with ``ConfigError``.

    Meta layers are materialised (and weights loaded from ``initialisation.init_from``) only for this rank's stages.
    """
    initialisation.check(layers)  # every process alike, before any communication
    spatial_layers = _check_spatial(run.spatial, layers)
    built = _schedule_for(schedule, options, dist.get_world_size() // run.spatial, run)
    config, placement = built.config, built.placement
    layout = Layout(config.ranks, config.data_parallel, run.spatial)
    global_rank = dist.get_rank()
    rank, replica = layout.pipeline_rank(global_rank), layout.replica(global_rank)
    groups = make_groups(layout, global_rank, placement.loss_rank, spatial_layers)
    device = torch.device(device) if device is not None else _default_device()
    boundaries = split_layers(layers, placement.stages, partition, sample)
    tied = find_tied(layers, boundaries)
    built = _with_ties(built, tie_groups(tied))
    config = built.config
    stages = _local_stages(layers, boundaries, placement, rank, device, groups.spatial, initialisation)
    untie_local(stages, tied)  # before the shards: each holder's flat buffer holds its own copy
    start_replicas_equal(stages, layout, global_rank, groups, run.timeout)  # before the weights are sharded
    shards = _shards(stages, config, replica, groups.data, device, tied)
    ties = LocalTies(tied, config.ties, shards, layout, global_rank, placement)
    optimizers = _optimizers(optimizer, shards, config.streams)
    schedulers = build_schedulers(scheduler, optimizers)
    # A function of the shards, not a bound method: the meter must not keep the pipeline (and its groups) alive.
    meter = ActivationMeter(functools.partial(_weight_pointers, shards)) if track_memory else None
    members = layout.pipeline_members(replica, layout.spatial_index(global_rank))
    context = _context(built, rank, members, device, run, groups)
    chunk_loss = ChunkLoss(loss_fn) if run.spatial > 1 else None
    local = _local(stages, shards, optimizers, schedulers, config.recompute_modes)
    executor = _executor(built, context, local, chunk_loss or loss_fn, meter, groups.pipeline)
    executor.ties = ties
    shapes = BoundaryShapes(ShapeAgreement(context, stages, groups.pipeline), shards, run.timeout, global_rank)
    batches = Batches(
        config.microbatches, layout, global_rank, groups.spatial, chunk_loss, run.check_every, run.timeout, device,
        getattr(loss_fn, "counted_targets", None),
    )  # fmt: skip
    loss_rank = members[placement.loss_rank]
    loss = LossSharing(context, layout, groups, global_rank, loss_rank, early=context.lookahead > 0)
    buffers = ReplicaBuffers(stages, layout, global_rank, groups.data, run.timeout, run.broadcast_buffers)
    model = LocalModel(stages, buffers, updates=optimizer is not None)
    runs = (AsyncStream if config.streams else FlushedRuns)(built, executor, shards, batches, shapes, loss, model)
    parts = (built, layout, global_rank, groups, device, boundaries, stages, shards, optimizers, meter, executor)
    return Assembly(*parts, loss_rank, shapes, runs, schedulers, tied)


def _with_ties(schedule: Schedule, ties) -> Schedule:
    """Return ``schedule`` built again with the tie groups the layers hold (as it is when they are its own).

    Refuses, with ``ConfigError``, ties the schedule cannot sum (async, early steps)."""
    if schedule.config.ties == ties:
        return schedule
    return build_schedule(dataclasses.replace(schedule.config, ties=ties))


def _local_stages(
    layers: list[nn.Module], boundaries: list, placement, rank: int, device: torch.device, spatial_group, initialisation
) -> dict[int, Stage]:
    """Return the stages this rank holds, by index, on ``device``, with their spatial group and recomputation regions
    (their meta layers materialised there, their weights loaded as ``initialisation`` says)."""
    owned = [(first, end) for stage, (first, end) in enumerate(boundaries) if placement.rank_of(stage) == rank]
    initialisation.apply(layers, [index for first, end in owned for index in range(first, end)], device)
    stages = {
        stage: Stage(stage, first, layers[first:end]).to(device)
        for stage, (first, end) in enumerate(boundaries)
        if placement.rank_of(stage) == rank
    }
    hand_group(stages.values(), spatial_group)
    for stage in stages.values():
        mark_regions(stage)  # submodules marked recompute_region become regions for recompute="selective"
    return stages


def _shards(stages: dict, config, replica: int, data_group, device: torch.device, tied) -> dict[int, StageShard]:
    """Return each local stage's shard of its weights and gradients (a tied parameter's later copies uncounted)."""
    return {
        index: StageShard(
            stage, config.zero, config.data_parallel, replica, data_group, device, uncounted_names(tied, index)
        )
        for index, stage in stages.items()
    }


def _local(stages: dict, shards: dict, optimizers: dict, schedulers: dict, recompute_modes) -> dict[int, LocalStage]:
    """Return what the executor runs of each local stage: its layers, shard, optimizer, recomputation and scheduler."""
    return {
        index: LocalStage(stage, shards[index], optimizers.get(index), recompute_modes[index], schedulers.get(index))
        for index, stage in stages.items()
    }


def _optimizers(optimizer: Callable | None, shards: dict[int, StageShard], streaming: bool) -> dict:
    """Return an optimizer per stage that has something to optimise; refuse async without one."""
    if streaming and optimizer is None:
        raise ConfigError(
            "optimizer",
            None,
            "async updates every stage inside the stream: give optimizer=callable(params) -> Optimizer",
        )
    return {
        index: optimizer(shard.optimized)
        for index, shard in shards.items()
        if optimizer is not None and shard.optimized
    }


def _context(
    schedule: Schedule, rank: int, members: tuple[int, ...], device: torch.device, run: RunOptions, groups
) -> RankContext:
    """Return what this rank's runtime needs to know about the rank, with the message tags it claims."""
    config, placement = schedule.config, schedule.placement
    # NCCL runs a pair's operations in issue order, so nothing is received ahead of the program there.
    lookahead = 0 if dist.get_backend() == "nccl" else 2
    context = RankContext(
        rank,
        placement,
        config.microbatches,
        members,
        device,
        run.timeout,
        lookahead,
        config.data_parallel,
        config.update_every if config.streams else None,
        precision=run.precision,
        downward=groups.downward,
        clip_grad_norm=config.clip_grad_norm,
    )
    return dataclasses.replace(context, tag_offset=claim_message_tags(placement.stages, context.tag_window))


def _executor(schedule: Schedule, context: RankContext, local: dict, loss_fn: Callable, meter, group) -> Executor:
    """Return the interpreter of this rank's programs: the executor, or the async stream's."""
    config, placement = schedule.config, schedule.placement
    if not config.streams:
        return Executor(context, local, loss_fn, meter, group)
    versions = {
        index: WeightVersions(
            index,
            stage.module,
            stage.optimizer,
            config.weight_policy,
            config.delay_correction,
            stage_delay(placement.stages, index),
            config.update_every,
            config.delay_warmup,
        )
        for index, stage in local.items()
    }
    return StreamExecutor(context, local, loss_fn, meter, versions, group)


def _check_spatial(spatial: int, layers: list) -> bool:
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
    run.check_schedule(config.streams, config.skip_nonfinite)
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
    """Return this process's CUDA device on NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
