"""From a configuration to the lowered programs of every rank."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .actions import Kind, Program, expand_pairs
from .asynchronous import stream_slice
from .bulk import collector_paused
from .config import ConfigError, ScheduleConfig, validate_config
from .lowering import (
    add_gradient_reduces,
    add_guard,
    add_optimizer_steps,
    add_p2p,
    add_periodic_updates,
    add_recompute,
    add_weight_gathers,
)
from .placement import Placement, contiguous, looping, vshape
from .registry import names_where
from .ties import add_tie_sums
from .validation import validate


@dataclass(frozen=True)
class Schedule:
    """A configuration with its placement, compute programs and lowered programs.

    ``programs`` run a training step; ``forward`` a forward-only pass
    (evaluation, inference) with the same lowering: the schedule's forwards
    in its own order, their transfers and, at ZeRO-3, their weight gathers.
    """

    config: ScheduleConfig
    placement: Placement
    compute: tuple[Program, ...]
    programs: tuple[Program, ...]
    calls: int = 1
    """How many consecutive ``train_step`` calls the programs span (micro-batches are numbered across them)."""

    @property
    def microbatch_count(self) -> int:
        """Return the micro-batches the programs run, over all their calls."""
        return self.config.microbatches * self.calls

    @cached_property
    def forward(self) -> tuple[Program, ...]:
        """Return the lowered programs of a forward-only pass (built on first use)."""
        with collector_paused():
            return lower(self.forward_compute, self.config, self.placement, training=False)

    def forward_only(self) -> Schedule:
        """Return this schedule with its forward-only programs as ``programs`` (to simulate an evaluation)."""
        return Schedule(self.config, self.placement, self.forward_compute, self.forward, self.calls)

    @property
    def forward_compute(self) -> tuple[Program, ...]:
        """Return the compute programs of a forward-only pass: the schedule's forwards in order (a pair's too)."""
        return tuple(
            tuple(action for action in expand_pairs(program) if action.kind is Kind.F) for program in self.compute
        )


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
    return config.record.generate(placement, config.microbatches, config)


def lower(
    compute: tuple[Program, ...], config: ScheduleConfig, placement: Placement, training: bool = True
) -> tuple[Program, ...]:
    """Return the compute programs with every lowering pass the configuration asks for applied.

    With ``training`` false (forward-only programs) only weight gathers and
    transfers are added: nothing is reduced, stepped or recomputed.
    """
    programs = compute
    if config.zero == 3:
        programs = add_weight_gathers(programs, config.weight_buffers)
    if training and config.streams:
        programs = add_periodic_updates(programs, config.update_every, config.zero, config.data_parallel)
    elif training:
        if config.data_parallel > 1:
            programs = add_gradient_reduces(programs, config.reduce_portions, config.reduce_order)
        programs = add_optimizer_steps(programs, config.zero, config.step_placement == "early")
        if config.ties:
            programs = add_tie_sums(programs, config.ties)
        if config.clip_grad_norm is not None:  # its all-reduce carries the guard's agreement too
            programs = add_guard(programs, Kind.CLIP)
        elif config.skip_nonfinite:
            programs = add_guard(programs)
    programs = add_p2p(programs, placement)
    if training and config.recomputed_stages:
        programs = add_recompute(programs, config.recomputed_stages)
    return programs


def build_schedule(config: ScheduleConfig, check: bool = True, calls: int = 1) -> Schedule:
    """Return the schedule of ``config``: placement, compute programs, lowered training and forward-only programs.

    With ``calls`` > 1 the programs span that many consecutive ``train_step``
    calls (for the simulator): a flushed schedule's step repeated, its
    micro-batches numbered on (call ``n`` runs ``n·m .. n·m + m - 1``); the
    async stream runs ``calls·m`` sub-minibatches without draining between
    calls, and drains at the end.  Refuses an inconsistent configuration
    with ``ConfigError`` and, when ``check`` is true, programs that cannot
    run with ``ScheduleError``.
    """
    validate_config(config)
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ConfigError("calls", calls, "must be a whole number of at least 1")
    placement = make_placement(config)
    with collector_paused():
        if config.streams:
            compute = config.record.generate(placement, config.microbatches * calls, config)
            programs = lower(compute, config, placement)
        else:
            compute, programs = compute_programs(config, placement), None
            programs = _repeated(lower(compute, config, placement), config.microbatches, calls)
            compute = _repeated(compute, config.microbatches, calls)
        if check:
            validate(programs, placement, config.microbatches * calls)
    return Schedule(config, placement, compute, programs, calls)


def stream_programs(schedule: Schedule, start: int, first: int, count: int, drain: bool) -> tuple[Program, ...]:
    """Return the lowered programs of one slice of an async stream (see ``asynchronous.stream_slice``).

    What the runtime runs for one ``train_step`` call (``count`` =
    micro-batches, no drain) or a flush (``count = 0``, drain).  Slices are
    not validated one by one: the whole stream they cut is, in ``build_schedule``.
    """
    if not schedule.config.streams:
        streams = " or ".join(names_where(lambda record: record.streams))
        raise ConfigError("schedule", schedule.config.schedule, f"only the {streams} schedule runs as a stream")
    with collector_paused():
        compute = stream_slice(schedule.placement, start, first, count, drain)
        return lower(compute, schedule.config, schedule.placement)


def _repeated(programs: tuple[Program, ...], microbatches: int, calls: int) -> tuple[Program, ...]:
    """Return each program run ``calls`` times in a row, call ``n``'s micro-batches numbered from ``n·microbatches``."""
    if calls == 1:
        return programs
    return tuple(
        tuple(
            action if action.microbatch is None else action._replace(microbatch=action.microbatch + call * microbatches)
            for call in range(calls)
            for action in program
        )
        for program in programs
    )
