"""Tie groups: stages that hold one parameter, and the lowering pass that sums its gradient once per step.

A parameter tied across stages (one ``nn.Parameter`` held by layers of
several stages, as a language model's embedding and head) is kept by every
holding stage as a copy of its own.  Its gradient in one process is the sum
of its uses' gradients, so once per step, after the holders' backwards, the
copies' gradients are summed over the holders (``TIE``) and every copy steps
with the same sum.  A tie group is written with its first stage: ``0TIE``
sums the group whose lowest stage is 0.  Ties whose stages overlap are one
group (``merge_ties``), so that first stage names one group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .actions import COMPUTE_KINDS, Action, Kind, Program

Ties = tuple[tuple[int, ...], ...]
"""Tie groups: each the sorted stages holding one set of tied parameters; groups sorted by their first stage."""


def merge_ties(holders: Iterable[Iterable[int]]) -> Ties:
    """Return the tie groups of ``holders`` (each the stages holding one parameter): overlapping sets merged,
    single stages dropped (a parameter shared inside one stage is one parameter of it)."""
    groups: list[set[int]] = []
    for stages in holders:
        merged = set(stages)
        if len(merged) < 2:
            continue
        for group in [group for group in groups if group & merged]:
            merged |= group
            groups.remove(group)
        groups.append(merged)
    return tuple(sorted(tuple(sorted(group)) for group in groups))


def check_ties(ties: object, stages: int) -> str | None:
    """Return why ``ties`` is not a valid set of tie groups over ``stages`` stages, or ``None`` when it is."""
    if not isinstance(ties, tuple) or any(not isinstance(group, tuple) for group in ties):
        return "must be a tuple of tuples of stage indices"
    if merge_ties(ties) != ties:
        return "must be disjoint sorted groups of at least two stages, sorted by their first stage"
    if any(not 0 <= stage < stages for group in ties for stage in group):
        return f"names a stage outside 0..{stages - 1}"
    return None


def add_tie_sums(programs: Sequence[Program], ties: Ties) -> tuple[Program, ...]:
    """Return programs with, on every rank holding a stage of a tie group, that group's ``TIE`` before the rank's
    first ``STEP``, and the ``REDUCE`` of the rank's holding stages moved right after it.

    The sum comes after every backward of the rank, so that no rank waits in it for a peer whose backward still
    needs this rank's gradients; the data-parallel reduce of a holding stage follows it, so each replica sums
    its holders' local gradients and the reduce sums the replicas (both sums: the order does not change the
    result, and each ZeRO shard then holds the summed gradient of its part).  Expects the steps at the end.
    """
    lowered = []
    for program in programs:
        held = {action.stage for action in program if action.kind in COMPUTE_KINDS}
        groups = [group for group in ties if held & set(group)]
        if not groups:
            lowered.append(tuple(program))
            continue
        holding = held & {stage for group in groups for stage in group}
        moved = [action for action in program if action.kind is Kind.REDUCE and action.stage in holding]
        kept = [action for action in program if not (action.kind is Kind.REDUCE and action.stage in holding)]
        first_step = next((index for index, action in enumerate(kept) if action.kind is Kind.STEP), len(kept))
        sums = [Action(group[0], Kind.TIE) for group in groups]
        lowered.append(tuple(kept[:first_step] + sums + moved + kept[first_step:]))
    return tuple(lowered)


def tie_members(programs: Sequence[Program]) -> dict[int, frozenset[int]]:
    """Return, per tie group (by its first stage), the ranks whose programs sum it: the ranks that meet in its ``TIE``."""
    members: dict[int, set[int]] = {}
    for rank, program in enumerate(programs):
        for action in program:
            if action[1] is Kind.TIE:
                members.setdefault(action[0], set()).add(rank)
    return {stage: frozenset(ranks) for stage, ranks in members.items()}
