"""Scenarios: clusters and models described once as costs and configurations, for benchmarks, tests and planning.

``paper_52b`` is the setting of Lamy-Poirier, "Breadth-First Pipeline
Parallelism" (MLSys 2023, arXiv 2211.05953): a 52-billion-parameter GPT (64
layers, width 8192, sequences of 2048 tokens), tensor parallel 8 inside a
node, pipeline ``p = 8`` with one layer per stage (``v = 8``) and 64
data-parallel replicas at ZeRO-3 (4,096 GPUs).  The costs are this
project's estimates from the stated sizes, not figures from the paper.
"""

from __future__ import annotations

from ..schedule.config import ScheduleConfig
from .cost import CostModel

LAYERS, WIDTH, TOKENS, TENSOR_PARALLEL = 64, 8192, 2048, 8
PIPELINE, STAGES_PER_RANK, REPLICAS = 8, 8, 64
EFFECTIVE_FLOPS = 150e12  # per GPU, bf16, sustained
NETWORK = 25e9 / 8  # bytes/s per GPU between nodes: one 200 Gb/s link per node shared by its 8 GPUs


def paper_52b_costs(network: float = NETWORK) -> CostModel:
    """Return the cost of one one-layer stage for one micro-batch (one sequence), per GPU, in seconds."""
    parameters = 12 * WIDTH * WIDTH / TENSOR_PARALLEL
    forward = 2 * parameters * TOKENS / EFFECTIVE_FLOPS
    return CostModel(
        forward_time=forward,
        backward_time=2 * forward,
        p2p_latency=10e-6,
        p2p_bandwidth=network,
        boundary_bytes=2 * TOKENS * WIDTH / TENSOR_PARALLEL,
        weight_bytes=2 * parameters,  # bf16 weights gathered, bf16 gradients reduce-scattered
        data_parallel_latency=50e-6,
        data_parallel_bandwidth=network,
    )


def paper_52b_configurations(microbatches: int) -> dict[str, ScheduleConfig]:
    """Return the compared schedules at ``microbatches`` micro-batches per replica."""
    common = dict(
        ranks=PIPELINE, microbatches=microbatches, stages_per_rank=STAGES_PER_RANK, data_parallel=REPLICAS, zero=3
    )
    return {
        "breadth-first": ScheduleConfig("breadth-first", **common),
        "depth-first, weights resident": ScheduleConfig("interleaved", **common),
        "depth-first, 2 weight buffers": ScheduleConfig("interleaved", weight_buffers=2, **common),
    }
