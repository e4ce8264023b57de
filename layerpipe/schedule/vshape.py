"""The V-shape schedules: two stages per rank in a V (stages ``r`` and ``2p-1-r`` on rank ``r``), backward split.

* ``zb-v``: ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024,
  section 6), in the order of ``torch.distributed.pipelining``'s
  ``ScheduleZBVZeroBubble`` (tests check it against the installed torch).
* ``v-half`` and ``v-min``: the controllable-memory schedules of Qi et al.,
  "Pipeline Parallelism with Controllable Memory" (NeurIPS 2024,
  arXiv 2405.15362), built from the paper's V-shape building block
  (``building_block``, ``controllable``).  The paper's observation: a rank's
  peak activation memory is the lifespan of its stages' activations (from a
  forward to its weight gradient) over the interval at which the block
  repeats, so the offsets between consecutive stages' passes set the memory.
  Offsets summing to ``d`` over a forward and a backward hop keep a rank's two
  stages alive about ``2(p-1)d`` slots per micro-batch, against about ``12p``
  for 1F1B's (and ZB-V's) memory: ``d = 3`` gives V-Half, ``d = 2`` (the least) V-Min.

Each generator takes the V-shape placement and the number of micro-batches
and returns one program per rank; the records at the end register them.
"""

from __future__ import annotations

from collections import Counter

from ..knobs import ConfigError
from .actions import Action, Kind, Program
from .placement import Placement, vshape
from .registry import Example, ScheduleRecord, register

F, I, W = Kind.F, Kind.I, Kind.W


class _RankOrder:
    """A rank's program being written: each ``add`` appends the next micro-batch of a (stage, kind)."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.counts: Counter = Counter()

    def add(self, stage: int, *kinds: Kind) -> None:
        """Append, for each kind in turn, the stage's next micro-batch of that kind."""
        for kind in kinds:
            self.actions.append(Action(stage, kind, self.counts[stage, kind]))
            self.counts[stage, kind] += 1

    def count(self, stage: int, kind: Kind) -> int:
        """Return how many actions of ``kind`` the stage has so far."""
        return self.counts[stage, kind]


def zb_v(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return ZB-V: ``ScheduleZBVZeroBubble``'s order on the V-shape placement, idle slots dropped.

    The order is written for ``max(m, 2p-1)`` micro-batches (enough to fill
    the V) and the actions of micro-batches ``m`` and beyond are dropped, as
    torch does.  With unit ``F``, ``I`` and ``W`` and ``m >= 2p-1`` it has
    close to no bubble at 1F1B's activation memory.
    """
    written = max(2 * placement.ranks - 1, microbatches)
    programs = []
    for rank in range(placement.ranks):
        order = _zb_v_rank(placement.ranks, rank, written)
        programs.append(tuple(action for action in order if action.microbatch < microbatches))
    return tuple(programs)


def _zb_v_rank(ranks: int, rank: int, microbatches: int) -> list[Action]:
    """Return rank ``rank``'s ZB-V order for ``microbatches`` micro-batches: warm-up, steady pairs, cool-down."""
    down, up = rank, 2 * ranks - 1 - rank  # the rank's stage on the way down the V, and on the way up
    order = _RankOrder()
    for _ in range(2 * (ranks - rank) - 1):
        order.add(down, F)
    for _ in range(rank):
        order.add(up, F)
        order.add(down, F)
    for _ in range(ranks - rank):
        order.add(up, F, I, W)
    while order.count(up, F) < order.count(down, F) or order.count(down, F) < microbatches:
        if order.count(down, F) < microbatches:
            order.add(down, F)
        order.add(down, I, W)
        order.add(up, F, I, W)
    for _ in range(rank):
        order.add(down, I)
        order.add(up, I)
    for _ in range(ranks - rank):
        order.add(down, I, W)
    for stage in (up, down):
        while order.count(stage, W) < order.count(stage, I):
            order.add(stage, W)
    return order.actions


# ---------------------------------------------------------------- controllable memory: V-Half and V-Min
CYCLE = 6
"""Slots between two micro-batches' building blocks: each rank runs six passes per micro-batch (F, I, W of two stages)."""

V_HALF_GAPS = ((1, 2), (2, 1))
"""V-Half's offsets between consecutive stages' passes: forward into an even stage 1, odd 2; backward the reverse."""

V_MIN_GAPS = ((1,), (1,))
"""V-Min's offsets: every pass starts as soon as the one it needs ends (the shortest lifespans)."""


def building_block(ranks: int, forward_gaps: tuple[int, ...], backward_gaps: tuple[int, ...]) -> dict:
    """Return the slot of each pass of one micro-batch, ``{(stage, kind): slot}``: the paper's V-shape building block.

    Forwards go down the V and up again (stage ``s`` waits ``forward_gaps[s %
    len]`` slots after stage ``s-1``'s forward), input gradients come back
    (stage ``s`` waits ``backward_gaps[s % len]`` after stage ``s+1``'s), and
    each weight gradient follows its input gradient as soon as it can.  At the
    bottom of the V the two stages share a rank and follow each other at once.
    A pass whose slot modulo ``CYCLE`` its rank already uses moves on to the
    next free one, so blocks repeated every ``CYCLE`` slots never collide.
    """
    placement, slots = vshape(ranks), {}
    taken: list[set[int]] = [set() for _ in range(ranks)]
    last = ranks * 2 - 1
    slot = _place(slots, taken, placement, 0, F, 0)
    for stage in range(1, last + 1):
        gap = 1 if stage == ranks else forward_gaps[stage % len(forward_gaps)]
        slot = _place(slots, taken, placement, stage, F, slot + gap)
    slot = _place(slots, taken, placement, last, I, slot + 1)
    for stage in range(last - 1, -1, -1):
        gap = 1 if stage == ranks - 1 else backward_gaps[stage % len(backward_gaps)]
        slot = _place(slots, taken, placement, stage, I, slot + gap)
    for stage in range(last, -1, -1):
        _place(slots, taken, placement, stage, W, slots[stage, I] + 1)
    return slots


def _place(slots: dict, taken: list[set[int]], placement: Placement, stage: int, kind: Kind, earliest: int) -> int:
    """Put the pass at the first slot from ``earliest`` whose residue its rank has free; return the slot."""
    rank, slot = placement.rank_of(stage), earliest
    while slot % CYCLE in taken[rank]:
        slot += 1
    taken[rank].add(slot % CYCLE)
    slots[stage, kind] = slot
    return slot


def controllable(
    placement: Placement, microbatches: int, forward_gaps: tuple[int, ...], backward_gaps: tuple[int, ...]
) -> tuple[Program, ...]:
    """Return the building block repeated every ``CYCLE`` slots, each rank's passes in the order of their slots.

    Running each rank's passes in that order as soon as their inputs arrive is
    the paper's squeeze (the order is kept, the gaps close).  Every pass comes
    after what it needs in the block, and micro-batch ``j``'s block is
    ``j·CYCLE`` later, so the order never waits on itself, whatever ``m``.
    """
    slots = building_block(placement.ranks, forward_gaps, backward_gaps)
    timed: list[list[tuple[int, Action]]] = [[] for _ in range(placement.ranks)]
    for (stage, kind), slot in slots.items():
        for microbatch in range(microbatches):
            timed[placement.rank_of(stage)].append((microbatch * CYCLE + slot, Action(stage, kind, microbatch)))
    return tuple(tuple(action for _, action in sorted(passes)) for passes in timed)


def v_half(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return V-Half (Qi et al., NeurIPS 2024): about half of 1F1B's activation memory and half its bubble.

    The paper states, for equal ``F``, ``I`` and ``W``, a peak of ``(p+2)//2``
    micro-batches of 1F1B's activations (``p``) and a bubble of about
    ``p/(2m)`` (1F1B: about ``p/m``).  The offsets alternate 1 and 2 slots,
    1.5 on average: a forward and a backward hop sum to 3.
    """
    return controllable(placement, microbatches, *V_HALF_GAPS)


def v_min(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return V-Min (Qi et al., NeurIPS 2024): about a third of 1F1B's activation memory, two thirds of its bubble.

    The paper states, for equal ``F``, ``I`` and ``W``, a peak of
    ``(p+4)//3`` micro-batches of 1F1B's activations (``p``) and a bubble of
    about ``2p/(3m)``.  Every offset is one slot, the least possible: a
    forward and a backward hop sum to 2.
    """
    return controllable(placement, microbatches, *V_MIN_GAPS)


# ---------------------------------------------------------------- rules and records
def _v_rules(config) -> None:
    """Refuse stages per rank other than 2 (a V holds two stages on each rank)."""
    if config.stages_per_rank != 2:
        raise ConfigError(
            "stages_per_rank",
            config.stages_per_rank,
            f"{config.schedule} puts two stages on each rank in a V (stages r and 2P-1-r): use 2",
        )


VSHAPE = ("vshape",)

register(
    ScheduleRecord(
        "zb-v",
        zb_v,
        VSHAPE,
        splits_backward=True,
        rules=_v_rules,
        examples=(
            Example(
                "zb-v",
                {"stages_per_rank": 2, "microbatches": 8},
                "ZB-V: two stages per rank in a V, backward split into `I` and `W`; with equal `F`, `I` and `W` "
                "close to no bubble at 1F1B's activation memory.",
            ),
        ),
    )
)
register(
    ScheduleRecord(
        "v-half",
        v_half,
        VSHAPE,
        splits_backward=True,
        rules=_v_rules,
        examples=(
            Example(
                "v-half",
                {"stages_per_rank": 2, "microbatches": 8},
                "V-Half (controllable memory): the V's building block with offsets of 1.5 passes on average; about "
                "half of 1F1B's activation memory and half its bubble.",
            ),
        ),
    )
)
register(
    ScheduleRecord(
        "v-min",
        v_min,
        VSHAPE,
        splits_backward=True,
        rules=_v_rules,
        examples=(
            Example(
                "v-min",
                {"stages_per_rank": 2, "microbatches": 8},
                "V-Min (controllable memory): every offset one pass; about a third of 1F1B's activation memory.",
            ),
        ),
    )
)

from . import dualpipe  # noqa: E402, F401  (DualPipeV, the V with overlapped pairs, registered after these)
