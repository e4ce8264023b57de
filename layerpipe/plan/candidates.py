"""The configurations the planner tries: each layout, micro-batch size, schedule, sharding and recomputation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..knobs import ConfigError
from ..schedule.config import ScheduleConfig, validate_config
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
    """Yield the schedule knobs to try on ``ranks`` pipeline ranks: name, stages per rank and group size."""
    yield {"schedule": "gpipe"}
    if ranks == 1:
        return
    yield {"schedule": "1f1b"}
    yield {"schedule": "zero-bubble", "stages_per_rank": 1}
    for stages_per_rank in range(2, min(max_stages_per_rank, layers // ranks) + 1):
        for name in ("interleaved", "breadth-first", "zero-bubble"):
            yield {"schedule": name, "stages_per_rank": stages_per_rank}
        group = 2 * ranks
        while group < microbatches:
            yield {"schedule": "grouped", "stages_per_rank": stages_per_rank, "group_size": group}
            group *= 2


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
