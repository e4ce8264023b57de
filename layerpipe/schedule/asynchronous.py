"""The async schedule (pipelined backpropagation): a stream of sub-minibatches that never drains between steps.

Its generator, the slice of the stream one call runs, the delay of each
stage and its own rules; registered in ``generators`` with the others.
"""

from __future__ import annotations

from ..knobs import ConfigError
from .actions import Action, Kind, Program
from .placement import Placement

F, B = Kind.F, Kind.B

ASYNC_OPTIONS = {"update_every": 1, "weight_policy": "stashed", "delay_correction": "none", "delay_warmup": 0}
"""The async schedule's own options and their defaults; other schedules refuse them."""


def asynchronous(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return pipelined backpropagation: a stream of sub-minibatches, one forward and one backward per stage per tick.

    Stage ``s`` of ``S`` runs, at tick ``t``, the forward of sub-minibatch
    ``t - s`` and then the backward of sub-minibatch ``t - 2(S-1) + s``, so a
    sub-minibatch's forward and backward at stage ``s`` are ``2(S-1-s)``
    ticks apart and the stage holds ``2(S-1-s) + 1`` of them in flight.  The
    stream never drains between steps; these programs end with the drain of
    the last sub-minibatch (the flush at the end of training, an evaluation
    or a checkpoint).  When to update the weights is the lowering's
    (``add_periodic_updates``).  Needs one stage per rank.
    """
    return stream_slice(placement, 0, 0, microbatches, drain=True)


def stage_delay(stages: int, stage: int) -> int:
    """Return the ticks between a sub-minibatch's forward and backward at ``stage`` of ``stages`` in the async
    stream, ``2(S-1-s)``; the first stage's, ``2(S-1)``, is also how long the stream takes to drain."""
    return 2 * (stages - 1 - stage)


def stream_slice(placement: Placement, start: int, first: int, count: int, drain: bool) -> tuple[Program, ...]:
    """Return the part of an async stream that one ``train_step`` call (or a flush) runs.

    The stream began at sub-minibatch ``start``; the call feeds
    sub-minibatches ``first .. first + count - 1``: on stage ``s`` it runs
    the ticks of their forwards, with the backwards of those ticks (of
    sub-minibatches fed earlier, from ``start`` on).  With ``drain`` it
    goes on with the remaining backwards, so that nothing stays in flight;
    ``count = 0`` with ``drain`` is the flush after the call that fed up to
    ``first - 1``.  A rank's slice needs only what its peers' slices of the
    same or earlier calls send, so calls run one after another without a
    deadlock.
    """
    stages = placement.stages
    programs = []
    for rank in range(placement.ranks):
        (stage,) = placement.stages_of(rank)
        delay = stage_delay(stages, stage)
        program = []
        for tick in range(first + stage, first + count + stage + (delay if drain else 0)):
            if tick - stage < first + count:
                program.append(Action(stage, F, tick - stage))
            if start <= tick - stage - delay:
                program.append(Action(stage, B, tick - stage - delay))
        programs.append(tuple(program))
    return tuple(programs)


def async_rules(config) -> None:
    """Refuse, with ``ConfigError``, an async configuration the stream cannot run."""
    if config.microbatches % config.update_every:
        raise ConfigError(
            "microbatches",
            config.microbatches,
            f"async needs a multiple of `update_every` "
            f"({config.update_every}), so that every call ends on whole virtual minibatches",
        )
    longest = stage_delay(config.stages, 0)
    if config.weight_policy == "double-buffered" and config.update_every < longest:
        raise ConfigError(
            "update_every",
            config.update_every,
            f"double-buffered weights hold two versions, so a "
            f"stage must not update more than once while a sub-minibatch is in flight: the first "
            f"stage's delay is {longest} ticks, so use `update_every` {longest} or more (or stashed "
            f"weights)",
        )
    if config.zero > 1:
        raise ConfigError(
            "zero", config.zero, "async updates each stage on its own after every k backwards: use `zero` 0 or 1"
        )
    if config.zero and "predict" in config.delay_correction:
        raise ConfigError(
            "delay_correction",
            config.delay_correction,
            "predicts the weights from the whole "
            "momentum, which `zero` 1 shards over the replicas: use `zero` 0 or spike",
        )
    _async_refusals(config)


def _async_refusals(config) -> None:
    """Refuse what the flushed schedules do and the stream does not (yet)."""
    if config.recomputed_stages:
        raise ConfigError("recompute", config.recompute, "async does not recompute yet: use none")
    if config.reduce_portions != 1:
        raise ConfigError("reduce_portions", config.reduce_portions, "async reduces each update whole: use 1")
    if config.reduce_order != "priority":
        raise ConfigError(
            "reduce_order",
            config.reduce_order,
            "async reduces each update right after its stage's backwards: use priority",
        )
    if config.skip_nonfinite:
        raise ConfigError(
            "skip_nonfinite", True, "async updates each stage on its own, with no step to guard together: leave it off"
        )
    if config.step_placement != "end":
        raise ConfigError(
            "step_placement",
            config.step_placement,
            "async places each update after its stage's backwards already: use end",
        )
