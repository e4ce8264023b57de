"""The configurations the planner tries: each layout, micro-batch size, schedule, sharding and recomputation."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from ..knobs import ConfigError
from ..schedule.config import ScheduleConfig, validate_config
from ..schedule.registry import ScheduleRecord, schedule_records
from ..sim.gpt_costs import GPTShape
from .request import PlanRequest


@dataclass(frozen=True)
class Candidate:
    """One configuration: the schedule's knobs and the micro-batch size (sequences)."""

    schedule: ScheduleConfig
    microbatch_size: int


def _divisors(number_: int) -> list[int]:
    return [k for k in range(1, number_ + 1) if number_ % k == 0]


def _schedules(ranks: int, microbatches: int, layers: int, max_stages_per_rank: int) -> Iterator[dict]:
    """Yield the schedule knobs to try on ``ranks`` pipeline ranks, read from the schedule registry.

    Every registered schedule that does not stream (the asynchronous one trains differently), on each placement
    its record names: one stage per rank; looping ``2 .. max_stages_per_rank`` stages a rank; the V-shape (two
    stages a rank).  A looping schedule runs at one stage per rank too, but only one that splits the backward
    differs there from the one-stage schedules already tried (ZB-H1).  On one rank every schedule runs alike, so
    only the first is tried.
    """
    most = min(max_stages_per_rank, layers // ranks)
    for record in schedule_records():
        if record.streams:
            continue
        if ranks == 1:
            yield {"schedule": record.name}
            return
        for knobs_ in _placements(record, most):
            for options in _options(record, ranks, microbatches):
                yield {"schedule": record.name, **knobs_, **options}


def _placements(record: ScheduleRecord, most: int) -> Iterator[dict]:
    """Yield the placement knobs to try for ``record`` with at most ``most`` stages a rank."""
    if record.family == "contiguous":
        yield {}
        return
    if "contiguous" in record.placements and record.splits_backward:
        yield {"stages_per_rank": 1}
    if "looping" in record.placements:
        for stages_per_rank in range(2, most + 1):
            yield {"stages_per_rank": stages_per_rank}
    if "vshape" in record.placements and most >= 2:
        implied = record.default_placement == "vshape"
        yield {"stages_per_rank": 2, **({} if implied else {"placement": "vshape"})}


def _group_sizes(ranks: int, microbatches: int) -> Iterator[int]:
    """Yield the group sizes to try between depth-first (``ranks``) and breadth-first (``microbatches``)."""
    group = 2 * ranks
    while group < microbatches:
        yield group
        group *= 2


OPTION_VALUES = {"group_size": _group_sizes}
"""The values the planner tries for a schedule's own option that has no default (``group_size``): a schedule
with such an option not listed here is not searched."""


def _options(record: ScheduleRecord, ranks: int, microbatches: int) -> Iterator[dict]:
    """Yield the schedule's own options to try: each value ``OPTION_VALUES`` gives, the record's default else."""
    chosen = [name for name, default in record.options.items() if default is None]
    if not chosen:
        yield {}
        return
    if any(name not in OPTION_VALUES for name in chosen):
        return
    for values in itertools.product(*(tuple(OPTION_VALUES[name](ranks, microbatches)) for name in chosen)):
        yield dict(zip(chosen, values))


def _sharding(data_parallel: int) -> Iterator[dict]:
    """Yield the ZeRO levels and reduce portions to try with ``data_parallel`` replicas."""
    if data_parallel == 1:
        yield {}
        return
    for zero in range(4):
        for portions in (1, 4):
            yield {"zero": zero, "reduce_portions": portions}


def candidates(request: PlanRequest, shape: GPTShape) -> Iterator[Candidate]:
    """Yield every valid configuration for ``request``: each layout, micro-batch size, schedule, sharding and
    recomputation that ``validate_config`` accepts."""
    for ranks in _divisors(request.gpus):
        data_parallel = request.gpus // ranks
        if ranks > shape.layers or request.global_batch % data_parallel:
            continue
        per_replica = request.global_batch // data_parallel
        for size in (s for s in _divisors(per_replica) if s <= request.max_microbatch_size):
            microbatches = per_replica // size
            for knobs_ in _schedules(ranks, microbatches, shape.layers, request.max_stages_per_rank):
                for sharding in _sharding(data_parallel):
                    for recompute in (
                        ("none", "selective", "full") if ranks * knobs_.get("stages_per_rank", 1) > 1 else ("none",)
                    ):
                        config = ScheduleConfig(
                            ranks=ranks,
                            microbatches=microbatches,
                            data_parallel=data_parallel,
                            recompute=recompute,
                            **knobs_,
                            **sharding,
                        )
                        try:
                            validate_config(config)
                        except ConfigError:
                            continue
                        yield Candidate(config, size)
