"""Simulated with the cluster presets, beside what two papers published: does the simulator reproduce their trends?

    python benchmarks/published_trends.py

1. Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
   Clusters Using Megatron-LM" (SC21, arXiv 2104.04473): their interleaved
   schedule "can improve throughput by 10+%" over the non-interleaved one
   (abstract); the gain comes from a bubble ``v`` times smaller, so it is
   largest at small batch and shrinks as the batch grows.  Simulated here:
   GPT-3 175B (96 layers of width 12288, 96 heads, 2048 tokens) on 96 A100s,
   tensor parallel 8 inside a node and pipeline 12, micro-batch 1, global
   batch 12 to 96, 1F1B against interleaved with 2 stages per rank.
2. Lamy-Poirier, "Breadth-First Pipeline Parallelism" (MLSys 2023, arXiv
   2211.05953): "an increase of up to 43% in training throughput for a 52
   billion-parameter model using a small batch size per GPU compared to
   Megatron-LM" (abstract).  Simulated here: the 52B GPT (64 layers of
   width 8192, 2048 tokens) on A100s, tensor parallel 8, pipeline 8 with 8
   one-layer stages per rank, 64 replicas at ZeRO-3 (the paper's layout),
   breadth-first against depth-first with two weight buffers (what
   Megatron-style depth-first can hold at ZeRO-3), as the batch per GPU
   grows.

3. The same paper's comparison as it was made: the best configuration of
   each kind, not one layout.  For each batch per GPU the planner's search
   (memory model included) finds the fastest Megatron-LM-style
   configuration (1F1B or interleaved, ZeRO at most 1: Megatron's
   distributed optimizer; its gradients reduced after the pipeline's
   backward, as Megatron-LM's ``train_step`` did before
   ``--overlap-grad-reduce``, megatron/training.py) and the fastest
   breadth-first one (any ZeRO level) of the 52B GPT on 512
   tensor-parallel groups of 8 A100s of 80 GB, each group modelled as one
   device of 8 times a GPU's compute, memory and links.

Tensor parallelism is modelled by dividing each device's compute, stored
activations, messages and weights by 8; its own all-reduces are left out
(layerpipe does not implement tensor parallelism), which favours the
large-``p`` configurations a little.  The published figures are quoted, not
re-derived: the comparison is of trends.  Results:
``benchmarks/results/published_trends.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform

from results_files import write_results

from layerpipe.plan import GIB, USABLE_MEMORY, Candidate, PlanRequest, best_among, candidates, describe, model_shape
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ScheduleConfig
from layerpipe.sim.cost import CostModel
from layerpipe.sim.gpt_costs import GPTShape, boundary_bytes, layer_forward_flops, layer_parameters, stage_sums
from layerpipe.sim.hardware import PRESETS, Hardware
from layerpipe.sim.partition import balance_counts
from layerpipe.sim.simulator import simulate

GPT3 = GPTShape(vocab_size=51200, block_size=2048, width=12288, heads=96, blocks=96)
GPT52 = GPTShape(vocab_size=51200, block_size=2048, width=8192, heads=64, blocks=64)
TENSOR_PARALLEL = 8


def blocks_only_costs(shape: GPTShape, hardware: Hardware, stages: int, data_parallel: int) -> CostModel:
    """Return the costs of ``stages`` equal stages of the model's blocks (the embedding and head left out, as the
    papers' layer counts do), one sequence per micro-batch, tensor parallel 8."""
    blocks = GPTShape(shape.vocab_size, shape.block_size, shape.width, shape.heads, shape.blocks)
    flops = layer_forward_flops(blocks, 1)[1:-1]
    boundaries = balance_counts([1.0] * shape.blocks, stages)
    forward = tuple(time / hardware.flops / TENSOR_PARALLEL for time in stage_sums(flops, boundaries))
    weights = tuple(2.0 * count / TENSOR_PARALLEL for count in stage_sums(layer_parameters(blocks)[1:-1], boundaries))
    _, data_bandwidth = hardware.link(False)
    return CostModel(
        forward_time=forward,
        backward_time=tuple(2 * time for time in forward),
        action_overhead=hardware.action_overhead,
        p2p_latency=hardware.inter_node_latency,
        p2p_bandwidth=hardware.inter_node_bandwidth,
        boundary_bytes=boundary_bytes(shape, 1, 2) / TENSOR_PARALLEL,
        weight_bytes=weights,
        data_parallel_latency=hardware.collective_latency,
        data_parallel_bandwidth=data_bandwidth,
    )


def megatron_rows(hardware: Hardware) -> list[dict]:
    """Return 1F1B against interleaved (v = 2) for GPT-3 175B on pipeline 12, for global batches 12 to 96."""
    rows = []
    for batch in (12, 24, 48, 96):
        times = {}
        for name, stages_per_rank in (("1f1b", 1), ("interleaved", 2)):
            config = ScheduleConfig(schedule=name, ranks=12, microbatches=batch, stages_per_rank=stages_per_rank)
            times[name] = simulate(
                build_schedule(config, check=False), blocks_only_costs(GPT3, hardware, 12 * stages_per_rank, 1)
            ).step_time
        rows.append(
            {
                "batch": batch,
                "1f1b": times["1f1b"],
                "interleaved": times["interleaved"],
                "gain": times["1f1b"] / times["interleaved"] - 1,
            }
        )
    return rows


def breadth_first_rows(hardware: Hardware) -> list[dict]:
    """Return breadth-first against depth-first with 2 weight buffers for the 52B GPT at ZeRO-3 over 64 replicas."""
    rows = []
    cost = blocks_only_costs(GPT52, hardware, 64, 64)
    for microbatches in (8, 16, 32, 64):
        common = dict(ranks=8, microbatches=microbatches, stages_per_rank=8, data_parallel=64, zero=3)
        breadth = simulate(build_schedule(ScheduleConfig("breadth-first", **common), check=False), cost).step_time
        depth = simulate(
            build_schedule(ScheduleConfig("interleaved", weight_buffers=2, **common), check=False), cost
        ).step_time
        rows.append(
            {
                "batch_per_gpu": microbatches / 64,
                "breadth_first": breadth,
                "depth_first": depth,
                "gain": depth / breadth - 1,
            }
        )
    return rows


BEST_BATCHES = (512, 1024, 2048, 4096)
"""Global batches of the best-configuration comparison: 0.125 to 1 sequence per GPU on 4,096 GPUs."""


def megatron_style(candidate: Candidate) -> Candidate:
    """Return ``candidate`` with its gradients reduced as Megatron-LM reduced them when the paper was written: once
    the pipeline's backward is over, whole (its ``--overlap-grad-reduce`` came in 2023)."""
    schedule = dataclasses.replace(candidate.schedule, reduce_order="after-flush", reduce_portions=1)
    return dataclasses.replace(candidate, schedule=schedule)


def best_configuration_rows(hardware: Hardware) -> list[dict]:
    """Return, per global batch, the fastest Megatron-style and the fastest breadth-first configuration of the 52B
    GPT on 512 tensor-parallel groups of 8 GPUs (the planner's search and memory model)."""
    group = dataclasses.replace(
        hardware,
        flops=TENSOR_PARALLEL * hardware.flops,
        memory_bandwidth=TENSOR_PARALLEL * hardware.memory_bandwidth,
        devices_per_node=1,
        inter_node_bandwidth=TENSOR_PARALLEL * hardware.inter_node_bandwidth,
    )
    shape, limit = model_shape("gpt-52b"), TENSOR_PARALLEL * 80 * GIB * USABLE_MEMORY
    rows = []
    for batch in BEST_BATCHES:
        found = list(
            candidates(
                PlanRequest(model="gpt-52b", gpus=512, gpu_memory=TENSOR_PARALLEL * 80.0, global_batch=batch), shape
            )
        )
        megatron = list(
            dict.fromkeys(
                megatron_style(c)
                for c in found
                if c.schedule.schedule in ("1f1b", "interleaved") and c.schedule.zero <= 1
            )
        )
        breadth = [c for c in found if c.schedule.schedule == "breadth-first"]
        best = {
            name: best_among(chosen, shape, group, limit)
            for name, chosen in (("megatron", megatron), ("breadth_first", breadth))
        }
        rows.append(
            {
                "batch_per_gpu": batch / (512 * TENSOR_PARALLEL),
                **{name: describe(entries[0]) if entries else None for name, entries in best.items()},
                **{f"{name}_step": entries[0].step_time if entries else None for name, entries in best.items()},
            }
        )
        if best["megatron"] and best["breadth_first"]:
            rows[-1]["gain"] = best["megatron"][0].step_time / best["breadth_first"][0].step_time - 1
    return rows


def main() -> None:
    hardware = PRESETS["a100"]
    megatron, breadth, best = megatron_rows(hardware), breadth_first_rows(hardware), best_configuration_rows(hardware)
    today = datetime.date.today().isoformat()
    lines = [
        f"# The simulator on the A100 preset beside published trends ({today})",
        "",
        "## Interleaved against 1F1B: GPT-3 175B, 96 A100s (tensor 8 × pipeline 12), micro-batch 1",
        "",
        'Published (Narayanan et al., SC21, abstract): the interleaved schedule "can improve throughput by 10+%".',
        "",
        "| global batch | 1F1B step (s) | interleaved step (s) | interleaved gain |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['batch']} | {row['1f1b']:.2f} | {row['interleaved']:.2f} | {row['gain']:.1%} |" for row in megatron
    ]
    lines += [
        "",
        "## Breadth-first against depth-first at ZeRO-3: 52B GPT, 4,096 A100s (tensor 8 × pipeline 8 × data 64)",
        "",
        'Published (Lamy-Poirier, MLSys 2023, abstract): "an increase of up to 43% in training '
        'throughput ... using a small batch size per GPU compared to Megatron-LM".',
        "",
        "| sequences per GPU | depth-first, 2 weight buffers (s) | breadth-first (s) | breadth-first gain |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['batch_per_gpu']:g} | {row['depth_first']:.2f} | {row['breadth_first']:.2f} | {row['gain']:.1%} |"
        for row in breadth
    ]
    lines += [
        "",
        "## The best of each: Megatron-LM-style against breadth-first, 52B GPT, 512 tensor-parallel groups of 8 A100s",
        "",
        'Published (Lamy-Poirier, MLSys 2023, abstract): up to 43% more throughput "using a small '
        'batch size per GPU compared to Megatron-LM".',
        "",
        "| sequences per GPU | best Megatron-style (1F1B or interleaved, ZeRO ≤ 1, reduce after the backward) "
        "| step (s) | best breadth-first "
        "| step (s) | breadth-first gain |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['batch_per_gpu']:g} | {row['megatron'] or 'nothing fits'} | "
        f"{row['megatron_step'] or float('nan'):.2f} | {row['breadth_first'] or 'nothing fits'} | "
        f"{row['breadth_first_step'] or float('nan'):.2f} | "
        f"{format(row['gain'], '.1%') if 'gain' in row else '-'} |"
        for row in best
    ]
    record = {
        "date": today,
        "machine": platform.node(),
        "hardware": hardware.name,
        "sources": list(hardware.sources),
        "megatron": megatron,
        "breadth_first": breadth,
        "best_of_each": best,
    }
    print(
        write_results(
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), "published_trends", record, lines
        )
    )


if __name__ == "__main__":
    main()
