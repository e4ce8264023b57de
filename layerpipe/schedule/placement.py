"""Placements: which pipeline rank owns which stage."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Placement:
    """Stage ``s`` lives on rank ``stage_ranks[s]``; ranks are ``0..ranks-1``."""

    name: str
    ranks: int
    stage_ranks: tuple[int, ...]

    @property
    def stages(self) -> int:
        """Return the number of stages."""
        return len(self.stage_ranks)

    def rank_of(self, stage: int) -> int:
        """Return the rank that owns ``stage``."""
        return self.stage_ranks[stage]

    @cached_property
    def _stages_by_rank(self) -> tuple[tuple[int, ...], ...]:
        by_rank: list[list[int]] = [[] for _ in range(self.ranks)]
        for stage, rank in enumerate(self.stage_ranks):
            by_rank[rank].append(stage)
        return tuple(tuple(stages) for stages in by_rank)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """Return the stages that ``rank`` owns, in increasing order."""
        return self._stages_by_rank[rank]

    @cached_property
    def sends_forward(self) -> tuple[bool, ...]:
        """Return, per stage, whether its output crosses to another rank (so the next stage receives it)."""
        ranks = self.stage_ranks
        return tuple(s + 1 < len(ranks) and ranks[s + 1] != ranks[s] for s in range(len(ranks)))

    @cached_property
    def receives_forward(self) -> tuple[bool, ...]:
        """Return, per stage, whether its input comes from another rank (so it sends its input gradient back)."""
        ranks = self.stage_ranks
        return tuple(s > 0 and ranks[s - 1] != ranks[s] for s in range(len(ranks)))

    @property
    def loss_rank(self) -> int:
        """Return the rank of the last stage: the rank that computes the loss (rank 0 on the V-shape)."""
        return self.stage_ranks[-1]

    @property
    def stages_per_rank(self) -> int:
        """Return ``v``, the number of stages on each rank (the same on all)."""
        return self.stages // self.ranks


def contiguous(ranks: int) -> Placement:
    """Return one stage per rank: stage ``s`` on rank ``s``."""
    return Placement("contiguous", ranks, tuple(range(ranks)))


def looping(ranks: int, stages_per_rank: int) -> Placement:
    """Return the looping placement: stage ``s`` on rank ``s % ranks``."""
    return Placement("looping", ranks, tuple(stage % ranks for stage in range(ranks * stages_per_rank)))


def vshape(ranks: int) -> Placement:
    """Return the V-shape placement: rank ``r`` holds stages ``r`` and ``2p-1-r``.

    The last rank holds the two middle stages, so the turn from forward to
    backward needs no transfer (the placement of ZB-V and DualPipe-V).
    """
    stage_ranks = tuple(stage if stage < ranks else 2 * ranks - 1 - stage for stage in range(2 * ranks))
    return Placement("vshape", ranks, stage_ranks)
