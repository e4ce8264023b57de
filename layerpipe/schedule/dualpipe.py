"""DualPipeV: the V form of DeepSeek-V3's DualPipe, in the order of torch's ``ScheduleDualPipeV``.

Two stages per rank in a V (stages ``r`` and ``2p-1-r`` on rank ``r``).  In
the steady phase each action is an overlapped pair ``(sFi;tBj)OVERLAP_F_B``:
one micro-batch's forward through one of the rank's stages beside another's
full backward through the other, which a registered overlap function
(``layerpipe.register_overlap``) may run together, e.g. to hide a
mixture-of-experts exchange behind compute; by default the halves run one
after the other.  The warm-up splits some backwards into ``I`` and ``W``
(zero bubble) and the cool-down the second half of them, as torch does.

Torch needs at least as many micro-batches as stages (``m >= 2p``); so does
the rule registered here.
"""

from __future__ import annotations

from collections import Counter

from ..knobs import ConfigError
from .actions import Action, Kind, Program, pair
from .placement import Placement
from .registry import Example, ScheduleRecord, register

F, B, I, W = Kind.F, Kind.B, Kind.I, Kind.W


class _DualOrder:
    """A rank's DualPipeV program being written, numbered as torch numbers it.

    A full backward advances the stage's ``I`` and ``W`` counts together; an ``I`` queues its ``W`` for later.
    """

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.counts: Counter = Counter()
        self.weights: list[tuple[int, int]] = []  # (stage, micro-batch) of the input gradients awaiting their W

    def add(self, stage: int, kind: Kind) -> None:
        """Append the stage's next ``F``, ``B`` or ``I``."""
        counted = I if kind is B else kind
        microbatch = self.counts[stage, counted]
        self.actions.append(Action(stage, kind, microbatch))
        self.counts[stage, counted] += 1
        if kind is B:
            self.counts[stage, W] += 1
        elif kind is I:
            self.weights.append((stage, microbatch))

    def add_pair(self, forward_stage: int, backward_stage: int) -> None:
        """Append the overlapped pair of the next forward of one stage and the next full backward of the other."""
        action = pair(forward_stage, self.counts[forward_stage, F], backward_stage, self.counts[backward_stage, I])
        self.actions.append(action)
        self.counts[forward_stage, F] += 1
        self.counts[backward_stage, I] += 1
        self.counts[backward_stage, W] += 1

    def add_pending_weight(self) -> None:
        """Append the oldest queued ``W``, if any."""
        if self.weights:
            stage, microbatch = self.weights.pop(0)
            self.actions.append(Action(stage, W, microbatch))
            self.counts[stage, W] += 1


def dualpipe_v(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return DualPipeV: ``ScheduleDualPipeV``'s order on the V-shape placement (needs ``m >= 2p``)."""
    ranks = placement.ranks
    if microbatches < 2 * ranks:
        raise ValueError(f"dualpipe-v needs at least {2 * ranks} micro-batches on {ranks} ranks (got {microbatches})")
    return tuple(_dualpipe_v_rank(ranks, rank, microbatches) for rank in range(ranks))


def _dualpipe_v_rank(ranks: int, rank: int, microbatches: int) -> Program:
    """Return rank ``rank``'s DualPipeV order: warm-up, zero-bubble fill, overlapped pairs, cool-down."""
    down, up = rank, 2 * ranks - 1 - rank
    order = _DualOrder()
    for _ in range((ranks - rank - 1) * 2):
        order.add(down, F)
    for _ in range(rank + 1):
        order.add(down, F)
        order.add(up, F)
    for _ in range(ranks - rank - 1):
        order.add(up, I)
        order.add_pending_weight()
        order.add(up, F)
    for step in range(microbatches - ranks * 2 + rank + 1):
        if step == 0 and rank == ranks - 1:  # torch does not pair these two, to shorten the bubble
            order.add(down, F)
            order.add(up, B)
        else:
            order.add_pair(down, up)
        order.add_pair(up, down)
    for _ in range(ranks - rank - 1):
        order.add(up, B)
        order.add_pair(up, down)
    _cool_down(order, ranks, rank, down, up)
    return tuple(order.actions)


def _cool_down(order: _DualOrder, ranks: int, rank: int, down: int, up: int) -> None:
    """Append the last backwards: full ones, then (from the middle on) split ones, then the queued ``W``."""
    split = False
    for step in range(rank + 1):
        if step == (rank + 1) // 2 and rank % 2 == 1:
            split = True
        order.add(up, I if split else B)
        if step == (rank + 1) // 2 and rank % 2 == 0:
            split = True
        order.add(down, I if split else B)
    for _ in range(ranks - rank - 1):
        order.add_pending_weight()
        order.add(down, I if split else B)
    for _ in range(rank + 1):
        order.add_pending_weight()


def _dualpipe_rules(config) -> None:
    """Refuse what DualPipeV cannot run: stages per rank other than 2, fewer micro-batches than stages, and fewer
    than two gathered-weight buffers (a pair uses both of the rank's stages at once)."""
    if config.stages_per_rank != 2:
        raise ConfigError(
            "stages_per_rank", config.stages_per_rank, "dualpipe-v puts two stages on each rank in a V: use 2"
        )
    stages = 2 * config.ranks
    if config.microbatches < stages:
        raise ConfigError(
            "microbatches",
            config.microbatches,
            f"dualpipe-v needs at least as many micro-batches as stages, {stages} on {config.ranks} ranks",
        )
    if config.weight_buffers is not None and config.weight_buffers < 2:
        raise ConfigError(
            "weight_buffers", config.weight_buffers, "dualpipe-v's pairs use both of a rank's stages at once: use 2"
        )


register(
    ScheduleRecord(
        "dualpipe-v",
        dualpipe_v,
        ("vshape",),
        splits_backward=True,
        rules=_dualpipe_rules,
        examples=(
            Example(
                "dualpipe-v",
                {"stages_per_rank": 2, "microbatches": 8},
                "DualPipeV (DeepSeek-V3): two stages per rank in a V; in the steady phase one micro-batch's forward "
                "is paired with another's backward (OVERLAP_F_B), which an overlap function can run together.",
            ),
        ),
    )
)
