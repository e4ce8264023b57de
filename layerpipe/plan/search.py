"""The search: candidates from the lowest ideal time up, until none left can beat the best few simulated."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..knobs import ConfigError
from ..schedule.bulk import collector_paused
from ..sim.gpt_costs import GPTShape
from ..sim.hardware import Hardware
from .candidates import Candidate, candidates
from .choice import horizon, keep_best, same_entry, simplest_first
from .costs import costs_of, ideal_time
from .measure import PlanEntry
from .memory import memory_floor
from .pool import evaluator
from .request import GIB, USABLE_MEMORY, PlanRequest, describe_shape, hardware_of, model_shape


@dataclass(frozen=True)
class PlanResult:
    """The best entries, best first, and how many candidates the search saw, refused for memory and simulated."""

    best: tuple[PlanEntry, ...]
    candidates: int
    too_big: int
    simulated: int
    hardware: Hardware
    shape: GPTShape


def plan(request: PlanRequest, progress: Callable[[int, int], None] | None = None) -> PlanResult:
    """Return the best ``request.top`` configurations for ``request``.

    ``progress(done, total)`` is called as each few candidates are looked
    at (for a progress bar).  The first entry is the one to use: the
    simplest of those within ``NEAR_TIE`` of the fastest; the others follow
    fastest first.
    Refuses, with ``ConfigError``: an unknown model, a bad cost file, and a
    request nothing fits (naming what would be needed).
    """
    shape, hardware = model_shape(request.model), hardware_of(request)
    limit = request.gpu_memory * GIB * USABLE_MEMORY
    ranked = _ranked(candidates(request, shape), shape, hardware)
    if not ranked:
        raise ConfigError("gpus", request.gpus, _no_layout_reason(request, shape))
    jobs = _jobs(request.jobs, ranked)
    with collector_paused():
        best, too_big, simulated, smallest = _search(ranked, request.top, shape, hardware, limit, progress, jobs)
    if not best:
        raise ConfigError("gpu_memory", request.gpu_memory, _too_big_reason(request, shape, smallest))
    return PlanResult(simplest_first(best)[: request.top], len(ranked), too_big, simulated, hardware, shape)


def best_among(
    chosen: Sequence[Candidate], shape: GPTShape, hardware: Hardware, memory_limit: float, top: int = 1, jobs: int = 0
) -> list[PlanEntry]:
    """Return the ``top`` fastest of ``chosen`` that fit in ``memory_limit`` bytes per device, fastest first
    (empty when none fits): the planner's search over candidates the caller picked, e.g. one family of
    schedules.  ``jobs``: processes that simulate side by side (0: one per core)."""
    ranked = _ranked(chosen, shape, hardware)
    with collector_paused():
        kept = _search(ranked, top, shape, hardware, memory_limit, None, _jobs(jobs, ranked))[0]
    return sorted(kept, key=lambda entry: entry.step_time)[:top]


def _ranked(chosen, shape: GPTShape, hardware: Hardware) -> list:
    """Return ``(ideal time, index, candidate)`` for each of ``chosen``, lowest ideal time first."""
    return sorted(
        ((ideal_time(c, costs_of(c, shape, hardware), hardware.cores), index, c) for index, c in enumerate(chosen)),
        key=lambda item: item[:2],
    )


def _jobs(asked: int, ranked: list) -> int:
    """Return how many processes simulate side by side: ``asked`` (0: one per core), fewer for a short list."""
    return min(asked or len(os.sched_getaffinity(0)), max(1, len(ranked) // 8))


def _search(ranked, top: int, shape: GPTShape, hardware: Hardware, limit: float, progress, jobs: int) -> tuple:
    """Return the entries worth showing (the ``top`` fastest and every one within ``NEAR_TIE`` of the fastest,
    fastest first), the counts of candidates too big and simulated, and the least memory a candidate needs.

    Candidates go to ``jobs`` processes a few at a time, in order of their ideal time; the search stops when
    the next ideal time can beat none of the entries kept.
    """
    kept: list[PlanEntry] = []
    too_big = simulated = done = 0
    smallest = math.inf
    with evaluator(jobs, shape, hardware, limit) as evaluate_all:
        while done < len(ranked) and ranked[done][0] < horizon(kept, top):
            batch = [candidate for _, _, candidate in ranked[done : done + 4 * jobs]]
            done += len(batch)
            floors = [memory_floor(c, costs_of(c, shape, hardware)) for c in batch]
            results = evaluate_all([c for c, floor in zip(batch, floors) if floor <= limit])
            smallest = min([smallest] + [f for f in floors if f > limit] + [m for e, m in results if e is None])
            entries = [entry for entry, _ in results if entry is not None]
            too_big += len(batch) - len(entries)
            simulated += len(entries)
            for entry in entries:
                if not any(same_entry(entry, other) for other in kept):
                    kept = keep_best(kept + [entry], top)
            if progress:
                progress(done, len(ranked))
    return kept, too_big, simulated, smallest


def _no_layout_reason(request: PlanRequest, shape: GPTShape) -> str:
    return (
        f"no layout of {request.gpus} devices runs the model: pipeline ranks must divide the devices and be at "
        f"most its {shape.layers} layers, and the data-parallel replicas must divide `global_batch` "
        f"({request.global_batch})"
    )


def _too_big_reason(request: PlanRequest, shape: GPTShape, smallest: float) -> str:
    needed = smallest / USABLE_MEMORY / GIB
    return (
        f"no configuration of {describe_shape(shape)} on {request.gpus} devices fits: the smallest needs "
        f"{needed:.3g} GiB per device or more; use more `gpus` or devices with more memory"
    )
