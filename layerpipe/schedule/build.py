"""From a configuration to the lowered programs of every rank."""

from __future__ import annotations

from dataclasses import dataclass

from .actions import Kind, Program
from .bulk import collector_paused
from .config import ScheduleConfig, validate_config
from .generators import GENERATORS
from .lowering import add_gradient_reduces, add_optimizer_steps, add_p2p, add_recompute, add_weight_gathers
from .placement import Placement, contiguous, looping, vshape
from .validation import validate


@dataclass(frozen=True)
class Schedule:
    """A configuration with its placement, compute programs and lowered programs."""

    config: ScheduleConfig
    placement: Placement
    compute: tuple[Program, ...]
    programs: tuple[Program, ...]


def make_placement(config: ScheduleConfig) -> Placement:
    """Return the placement named by ``config.placement_name``."""
    name = config.placement_name
    if name == "contiguous":
        return contiguous(config.ranks)
    if name == "vshape":
        return vshape(config.ranks)
    return looping(config.ranks, config.stages_per_rank)


def compute_programs(config: ScheduleConfig, placement: Placement) -> tuple[Program, ...]:
    """Return the generator's compute program for every rank."""
    generator = GENERATORS[config.schedule]
    if config.schedule == "grouped":
        return generator(placement, config.microbatches, config.group_size)
    return generator(placement, config.microbatches)


def lower(compute: tuple[Program, ...], config: ScheduleConfig, placement: Placement) -> tuple[Program, ...]:
    """Return the compute programs with every lowering pass the configuration asks for applied."""
    programs = compute
    if config.data_parallel > 1 and config.zero == 3:
        programs = add_weight_gathers(programs, config.weight_buffers)
    if config.data_parallel > 1:
        programs = add_gradient_reduces(programs, config.reduce_portions, config.reduce_order == "priority")
    programs = add_optimizer_steps(programs, config.zero if config.data_parallel > 1 else 0)
    programs = add_p2p(programs, placement)
    if config.recompute:
        programs = add_recompute(programs, config.recompute)
    return programs


def build_schedule(config: ScheduleConfig, check: bool = True) -> Schedule:
    """Return the schedule of ``config``: placement, compute programs and lowered programs.

    Refuses an inconsistent configuration with ``ConfigError`` and, when
    ``check`` is true, programs that cannot run with ``ScheduleError``.
    """
    validate_config(config)
    placement = make_placement(config)
    with collector_paused():
        compute = compute_programs(config, placement)
        programs = lower(compute, config, placement)
        if check:
            validate(programs, placement, config.microbatches)
    return Schedule(config, placement, compute, programs)


def forward_programs(schedule: Schedule) -> tuple[Program, ...]:
    """Return the programs of a forward-only pass (evaluation, inference): the schedule's forwards with their transfers.

    The order of forwards is the schedule's own, so evaluation streams
    micro-batches the way training does.
    """
    forwards = tuple(tuple(action for action in program if action.kind is Kind.F) for program in schedule.compute)
    return add_p2p(forwards, schedule.placement)
