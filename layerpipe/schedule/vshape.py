"""The V-shape schedules: two stages per rank in a V (stages ``r`` and ``2p-1-r`` on rank ``r``), backward split.

* ``zb-v``: ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024,
  section 6), in the order of ``torch.distributed.pipelining``'s
  ``ScheduleZBVZeroBubble`` (tests check it against the installed torch).
* ``v-half`` and ``v-min``: the controllable-memory schedules of Qi et al.,
  "Pipeline Parallelism with Controllable Memory" (NeurIPS 2024,
  arXiv 2405.15362), built from the paper's V-shape building block
  (``controllable``).

Each generator takes the V-shape placement and the number of micro-batches
and returns one program per rank; the records at the end register them.
"""

from __future__ import annotations

from collections import Counter

from ..knobs import ConfigError
from .actions import Action, Kind, Program
from .placement import Placement
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
