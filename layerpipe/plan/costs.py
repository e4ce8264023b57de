"""A candidate's cost model, from the GPT's counts on the hardware's figures, and the ideal time it cannot beat."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..sim.cost import CostModel
from ..sim.gpt_costs import (
    GPTShape,
    boundary_bytes,
    layer_activation_bytes,
    layer_forward_flops,
    layer_parameters,
    layer_recompute_flops,
    stage_sums,
)
from ..sim.hardware import Hardware
from ..sim.partition import balance_counts
from .candidates import Candidate


@dataclass(frozen=True)
class Costs:
    """A candidate's cost model and the per-stage figures its memory needs."""

    cost: CostModel
    full_activation: tuple[float, ...]
    stored_activation: tuple[float, ...]
    weights: tuple[float, ...]


@lru_cache(maxsize=65536)
def cached_costs(
    shape: GPTShape,
    hardware: Hardware,
    ranks: int,
    stages: int,
    data_parallel: int,
    size: int,
    recompute: tuple[str, ...],
    optimizer_shards: int,
    slowdown: float = 1.0,
    split: bool = False,
) -> Costs:
    """Return the cost model of ``stages`` balanced stages of ``shape`` on ``hardware`` at micro-batch ``size``."""
    boundaries = balance_counts(layer_parameters(shape), stages)
    rate = hardware.flops * hardware.rate_at(size) / slowdown
    seconds = lambda flops: tuple(value / rate for value in stage_sums(flops, boundaries))  # noqa: E731
    forward = seconds(layer_forward_flops(shape, size))
    element = hardware.activation_element_bytes
    by_mode = {
        mode: (
            seconds(layer_recompute_flops(shape, size, mode)),
            stage_sums(layer_activation_bytes(shape, size, element, mode), boundaries),
        )
        for mode in {"none", *recompute}
    }
    recompute_time = tuple(by_mode[mode][0][stage] for stage, mode in enumerate(recompute))
    full = by_mode["none"][1]
    stored = tuple(by_mode[mode][1][stage] for stage, mode in enumerate(recompute))
    weights = tuple(4.0 * count for count in stage_sums(layer_parameters(shape), boundaries))  # fp32 master weights
    if hardware.precision != "fp32":  # each forward under autocast saves its own 16-bit copy of the weights it used
        full = tuple(kept + weight / 2 for kept, weight in zip(full, weights))
        stored = tuple(
            kept + (weight / 2 if mode != "full" else 0.0) for kept, weight, mode in zip(stored, weights, recompute)
        )
    p2p_latency, p2p_bandwidth = hardware.link(ranks * data_parallel <= hardware.devices_per_node)
    _, data_bandwidth = hardware.link(data_parallel <= hardware.devices_per_node)
    cost = CostModel(
        forward_time=forward,
        backward_time=tuple(
            hardware.backward_ratio * (hardware.split_backward if split else 1.0) * time for time in forward
        ),
        recompute_time=recompute_time,
        optimizer_time=7 * max(weights) / optimizer_shards / hardware.memory_bandwidth,
        action_overhead=hardware.action_overhead,
        send_time=hardware.send_time,
        receive_time=hardware.receive_time,
        p2p_latency=p2p_latency,
        p2p_bandwidth=p2p_bandwidth,
        boundary_bytes=(boundary_bytes(shape, size, element),) * (stages - 1) + (0.0,),
        activation_bytes=full,
        weight_bytes=weights,
        data_parallel_latency=hardware.collective_latency,
        data_parallel_bandwidth=data_bandwidth,
    )
    return Costs(cost, full, stored, weights)


def costs_of(candidate: Candidate, shape: GPTShape, hardware: Hardware, slowdown: float = 1.0) -> Costs:
    """Return the costs of ``candidate``, its compute ``slowdown`` times slower than each device alone (zero-bubble's
    backward, split in two, ``Hardware.split_backward`` times longer)."""
    config = candidate.schedule
    return cached_costs(
        shape,
        hardware,
        config.ranks,
        config.stages,
        config.data_parallel,
        candidate.microbatch_size,
        config.recompute_modes,
        config.data_parallel if config.zero else 1,
        slowdown,
        config.record.splits_backward,
    )


def ideal_time(candidate: Candidate, costs: Costs, cores: int | None = None) -> float:
    """Return the busiest rank's compute time, or, when the processes share ``cores`` cores, the time those cores
    take for every process's compute if that is longer: no schedule of ``candidate`` runs a step faster."""
    config, cost = candidate.schedule, costs.cost
    per_stage = [
        config.microbatches
        * (f + b + (r if mode != "none" else 0.0) + (3 if mode != "none" else 2) * cost.action_overhead)
        for f, b, r, mode in zip(cost.forward_time, cost.backward_time, cost.recompute_time, config.recompute_modes)
    ]
    per_rank = [sum(per_stage[rank :: config.ranks]) for rank in range(config.ranks)]
    if cores is None:
        return max(per_rank)
    return max(max(per_rank), config.data_parallel * sum(per_rank) / cores)
