"""Which simulated entries the search keeps, when it may stop, and which one it recommends."""

from __future__ import annotations

import math

from .measure import PlanEntry

NEAR_TIE = 0.03
"""Predictions this close to the fastest count as a tie (the simulator is no more accurate than that): among them
the planner picks the simplest configuration."""


def horizon(kept: list[PlanEntry], top: int) -> float:
    """Return the ideal time from which no candidate can enter ``kept``."""
    if len(kept) < top:
        return math.inf
    return max(kept[top - 1].step_time, kept[0].step_time * (1 + NEAR_TIE))


def keep_best(entries: list[PlanEntry], top: int) -> list[PlanEntry]:
    """Return the ``top`` fastest of ``entries`` and every other one within ``NEAR_TIE`` of the fastest."""
    ordered = sorted(entries, key=lambda entry: entry.step_time)
    window = ordered[0].step_time * (1 + NEAR_TIE)
    return [entry for index, entry in enumerate(ordered) if index < top or entry.step_time <= window]


def simplest_first(entries: list[PlanEntry]) -> tuple[PlanEntry, ...]:
    """Return ``entries`` (fastest first) with the simplest of those within ``NEAR_TIE`` of the fastest moved to the
    front: the lowest ZeRO level, then the fewest reduce portions, no recomputation, the fewest stages per rank."""
    if not entries:
        return ()
    near = [entry for entry in entries if entry.step_time <= entries[0].step_time * (1 + NEAR_TIE)]
    chosen = min(
        near,
        key=lambda entry: (
            entry.candidate.schedule.zero,
            entry.candidate.schedule.reduce_portions,
            entry.candidate.schedule.recompute != "none",
            entry.candidate.schedule.stages_per_rank,
            entry.step_time,
        ),
    )
    return (chosen,) + tuple(entry for entry in entries if entry is not chosen)


def same_entry(entry: PlanEntry, other: PlanEntry) -> bool:
    """Return whether two entries differ only in knobs that change nothing (the earlier, simpler one is kept)."""
    return math.isclose(entry.step_time, other.step_time, rel_tol=1e-9) and math.isclose(
        entry.memory, other.memory, rel_tol=1e-9
    )
