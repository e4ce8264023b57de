"""Generators: the compute program (F, B, I, W) of every rank for one step, each registered as a schedule.

Each generator takes a placement and the number of micro-batches and returns
one program per rank.  Orders that ``torch.distributed.pipelining`` also
generates are the same order here, with its idle slots dropped (tests check
this against the installed torch).  The table at the end registers each
(``registry``) with its placements, options, rules and gallery examples; the
async stream's generator and rules are in ``asynchronous``, the V-shape
schedules' (``zb-v``, ``v-half``, ``v-min``) in ``vshape``, imported at the
end.  Adding a schedule is one generator and one ``register`` call here.
"""

from __future__ import annotations

from ..knobs import ConfigError
from .actions import Action, Kind, Program
from .asynchronous import ASYNC_OPTIONS, async_rules, asynchronous
from .placement import Placement
from .registry import Example, Generators, ScheduleRecord, register

F, B, I, W = Kind.F, Kind.B, Kind.I, Kind.W


def gpipe(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return GPipe: every forward of the step, then every backward, micro-batches in order.

    Equals ``ScheduleGPipe``'s order.
    """
    programs = []
    for rank in range(placement.ranks):
        stages = placement.stages_of(rank)
        forwards = [Action(stage, F, mb) for stage in stages for mb in range(microbatches)]
        backwards = [Action(stage, B, mb) for stage in reversed(stages) for mb in range(microbatches)]
        programs.append(tuple(forwards + backwards))
    return tuple(programs)


def one_f_one_b(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return 1F1B: ``p-1-r`` warm-up forwards on rank ``r``, then one forward one backward, then the rest.

    This is the order of DeepSpeed and Megatron.  It deliberately differs from
    torch 2.13's ``Schedule1F1B.pipeline_order``, which numbers the last
    rank's forwards from 1 and so skips micro-batch 0 there.
    """
    programs = []
    for rank in range(placement.ranks):
        (stage,) = placement.stages_of(rank)
        warmup = min(placement.ranks - 1 - rank, microbatches)
        program = [Action(stage, F, mb) for mb in range(warmup)]
        for mb in range(microbatches - warmup):
            program += [Action(stage, F, warmup + mb), Action(stage, B, mb)]
        program += [Action(stage, B, mb) for mb in range(microbatches - warmup, microbatches)]
        programs.append(tuple(program))
    return tuple(programs)


def _groups(microbatches: int, group_size: int) -> list[range]:
    """Return the micro-batch groups: ``group_size`` each, the remainder joining the last group.

    A last group smaller than the pipeline would deadlock the
    one-forward-one-backward phase, so no group is made smaller than
    ``group_size``.
    """
    starts = list(range(0, microbatches - group_size + 1, group_size)) or [0]
    return [range(first, end) for first, end in zip(starts, starts[1:] + [microbatches])]


def _group_order(stages: tuple[int, ...], microbatches: int, group_size: int, reverse: bool) -> list[tuple[int, int]]:
    """Return (stage, micro-batch) pairs: a group of micro-batches per stage, stage by stage, group by group."""
    local = list(reversed(stages)) if reverse else list(stages)
    return [(stage, mb) for group in _groups(microbatches, group_size) for stage in local for mb in group]


def grouped(placement: Placement, microbatches: int, group_size: int) -> tuple[Program, ...]:
    """Return the grouped family on the looping placement: 1F1B over groups of ``N`` micro-batches.

    A rank runs ``N`` micro-batches through one of its stages before moving to
    the next (Megatron's ``microbatch_group_size_per_vp_stage``).  Rank ``r``
    warms up with ``(v-1)·N + 2·(p-1-r)`` forwards (``N`` of the largest group), then alternates one
    forward and one backward, then finishes the backwards; backwards visit the
    stages in reverse.  ``N = p`` is Megatron's interleaved order; ``N = m``
    runs every micro-batch of a stage before the next stage (layered gradient
    accumulation) with the breadth-first bubble.  When ``N`` does not divide
    ``m`` the last group also takes the remainder (Megatron would run a
    smaller last group, which deadlocks when it is smaller than ``p``).
    """
    programs = []
    for rank in range(placement.ranks):
        stages = placement.stages_of(rank)
        forwards = _group_order(stages, microbatches, group_size, reverse=False)
        backwards = _group_order(stages, microbatches, group_size, reverse=True)
        total = len(forwards)
        largest_group = max(len(group) for group in _groups(microbatches, group_size))
        warmup = min((len(stages) - 1) * largest_group + 2 * (placement.ranks - 1 - rank), total)
        program = [Action(stage, F, mb) for stage, mb in forwards[:warmup]]
        for index in range(total - warmup):
            forward_stage, forward_mb = forwards[warmup + index]
            backward_stage, backward_mb = backwards[index]
            program += [Action(forward_stage, F, forward_mb), Action(backward_stage, B, backward_mb)]
        program += [Action(stage, B, mb) for stage, mb in backwards[total - warmup :]]
        programs.append(tuple(program))
    return tuple(programs)


def interleaved_group_size(ranks: int, microbatches: int) -> int:
    """Return the micro-batches run per stage before switching in torch's interleaved orders: ``m // max(1, m // p)``.

    That is ``p`` whenever ``p`` divides ``m``; interleaved and zero-bubble
    need ``m`` to be a multiple of the number of such rounds, ``max(1, m // p)``.
    """
    return microbatches // max(1, microbatches // ranks)


def interleaved(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return Megatron's interleaved (depth-first) 1F1B: the grouped order with ``N = m // max(1, m // p)``.

    ``N`` is ``p`` whenever ``p`` divides ``m``; the general rule is the one of
    ``ScheduleInterleaved1F1B``, whose order this equals.
    """
    return grouped(placement, microbatches, interleaved_group_size(placement.ranks, microbatches))


def breadth_first(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return breadth-first: each rank runs all micro-batches through a stage before its next stage.

    Forward visits the rank's stages in increasing order; backward visits them
    in decreasing order and finishes every micro-batch of a stage before any
    earlier stage (layered gradient accumulation), micro-batches in reverse as
    in ``ScheduleLoopedBFS``, whose order this equals.  Works on any placement
    (looping or V-shape).
    """
    programs = []
    for rank in range(placement.ranks):
        stages = placement.stages_of(rank)
        forwards = [Action(stage, F, mb) for stage in stages for mb in range(microbatches)]
        backwards = [Action(stage, B, mb) for stage in reversed(stages) for mb in reversed(range(microbatches))]
        programs.append(tuple(forwards + backwards))
    return tuple(programs)


def zero_bubble(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return ZB-H1 (Qi et al. 2024), interleaved over ``v`` stages per rank as ZB1P.

    ``B`` is split into ``I`` (input gradient, needed upstream at once) and
    ``W`` (weight gradient, can wait).  Rank ``r`` warms up with
    ``(v-1)·N + (p-1-r)`` forwards, then alternates forward and ``I``; from
    its ``r``-th steady step on, each step also runs the oldest waiting ``W``,
    and the remaining ``W`` close the step, filling the bubble.  With unit
    ``F``, ``I`` and ``W`` the step takes ``3·m + p - 1`` instead of 1F1B's
    ``3·m + 3·(p-1)``.  Equals ``ScheduleInterleavedZeroBubble``'s order.
    """
    group_size = interleaved_group_size(placement.ranks, microbatches)
    programs = []
    for rank in range(placement.ranks):
        stages = placement.stages_of(rank)
        forwards = _group_order(stages, microbatches, group_size, reverse=False)
        backwards = _group_order(stages, microbatches, group_size, reverse=True)
        total = len(forwards)
        warmup = min((len(stages) - 1) * group_size + (placement.ranks - 1 - rank), total)
        program = [Action(stage, F, mb) for stage, mb in forwards[:warmup]]
        weights_done = 0
        for index in range(total):
            if warmup + index < total:
                program.append(Action(forwards[warmup + index][0], F, forwards[warmup + index][1]))
            program.append(Action(backwards[index][0], I, backwards[index][1]))
            if index >= rank:
                program.append(Action(backwards[weights_done][0], W, backwards[weights_done][1]))
                weights_done += 1
        program += [Action(stage, W, mb) for stage, mb in backwards[weights_done:]]
        programs.append(tuple(program))
    return tuple(programs)


# ---------------------------------------------------------------- schedule-specific rules
def _grouped_rules(config) -> None:
    p, m, group_size = config.ranks, config.microbatches, config.group_size
    if group_size is None:
        raise ConfigError(
            "group_size", None, f"the grouped schedule needs one, between `ranks` ({p}) and `microbatches` ({m})"
        )
    if m < p:
        raise ConfigError("microbatches", m, f"grouped needs at least `ranks` ({p}) micro-batches")
    if not p <= group_size <= m:
        raise ConfigError("group_size", group_size, f"must be between `ranks` ({p}) and `microbatches` ({m})")


def _equal_rounds_rule(config) -> None:
    """Refuse micro-batches that do not split into ``m // p`` rounds of equal size (torch's interleaved orders)."""
    p, m = config.ranks, config.microbatches
    rounds = max(1, m // p)
    if m % rounds:
        raise ConfigError(
            "microbatches",
            m,
            f"{config.schedule} with `ranks` {p} needs a multiple of {rounds} (m // p rounds "
            f"of equal size, as in torch.distributed.pipelining), e.g. {rounds * (m // rounds)}",
        )


# ---------------------------------------------------------------- the built-in schedules, in the order of SCHEDULES
ONE_STAGE = ("contiguous",)
LOOPING = ("contiguous", "looping")

register(
    ScheduleRecord(
        "gpipe",
        gpipe,
        ONE_STAGE,
        examples=(Example("gpipe", {}, "All forwards, then all backwards: `m` activations stored per rank."),),
    )
)
register(
    ScheduleRecord(
        "1f1b",
        one_f_one_b,
        ONE_STAGE,
        examples=(
            Example("1f1b", {}, "Warm-up, then one forward one backward: at most `p - r` activations on rank `r`."),
        ),
    )
)
register(
    ScheduleRecord(
        "interleaved",
        interleaved,
        LOOPING,
        rules=_equal_rounds_rule,
        examples=(
            Example(
                "interleaved",
                {"stages_per_rank": 2},
                "Megatron's depth-first interleaved 1F1B: groups of `p` micro-batches per stage.",
            ),
        ),
    )
)
register(
    ScheduleRecord(
        "breadth-first",
        breadth_first,
        (*LOOPING, "vshape"),
        examples=(
            Example(
                "breadth-first",
                {"stages_per_rank": 2},
                "All micro-batches through a stage before the next; backward finishes a stage before any earlier one.",
            ),
            Example(
                "breadth-first-vshape",
                {"stages_per_rank": 2, "placement": "vshape"},
                "Breadth-first on the V-shape placement: the last rank turns from forward to backward without a "
                "transfer.",
            ),
        ),
    )
)
register(
    ScheduleRecord(
        "grouped",
        grouped,
        LOOPING,
        options={"group_size": None},
        generator_options=("group_size",),
        rules=_grouped_rules,
        examples=(
            Example(
                "grouped-6",
                {"microbatches": 12, "stages_per_rank": 2, "group_size": 6},
                "The family between them: groups of `N = 6` of `m = 12` micro-batches.",
            ),
        ),
    )
)
register(
    ScheduleRecord(
        "zero-bubble",
        zero_bubble,
        LOOPING,
        splits_backward=True,
        rules=_equal_rounds_rule,
        examples=(
            Example(
                "zero-bubble",
                {"stages_per_rank": 1},
                "ZB-H1: backward split into input gradient `I` and weight gradient `W`; `W` fills the bubble.",
            ),
        ),
    )
)
register(
    ScheduleRecord(
        "async",
        asynchronous,
        ONE_STAGE,
        options=ASYNC_OPTIONS,
        streams=True,
        rules=async_rules,
        examples=(
            Example(
                "async",
                {"update_every": 2},
                "Pipelined backpropagation: one forward and one backward per stage per tick, each stage stepping "
                "after every `k = 2` of its backwards without waiting for the others. Shown for one call with its "
                "drain; over consecutive calls the stream never drains (see below).",
            ),
        ),
    )
)

from . import vshape  # noqa: E402, F401  (the V-shape schedules, registered after these in their own module)

GENERATORS = Generators()
"""Generator of each schedule name, read from the registry; ``grouped``'s also takes ``group_size``."""
