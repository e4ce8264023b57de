"""Simulated: prioritised, portioned gradient reduces against DDP-style 25 MiB buckets.

    python benchmarks/reduce_order.py [--microbatches 16 64]

Same cluster and model as ``breadth_first_at_scale.py`` (52B GPT, p = 8,
v = 8, 64 replicas at ZeRO-3, 25 Gb/s per GPU).  Each one-layer stage has
about 201 MB of bf16 gradients, i.e. 8 buckets of PyTorch DDP's default
25 MiB (``bucket_cap_mb=25``); the prioritised order splits it into the
same 8 portions.  Reported per schedule: when stage 0's gradients are
reduced on rank 0 (what the next step's forward needs first), the step
time, what one more step adds when consecutive steps are simulated, and
the exposed data-parallel communication; each with the optimizer steps at
the end and early (``step_placement``: each stage's step after the next
stage's reduce).  Results go to
``benchmarks/results/reduce_order.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import platform
from datetime import date

from breadth_first_at_scale import configurations, layer_costs
from results_files import write_results

from layerpipe.schedule.actions import Kind
from layerpipe.schedule.build import build_schedule
from layerpipe.sim.simulator import simulate, steady_step

BUCKET_BYTES = 25 * 2**20


def stage0_ready(result) -> float:
    """Return when the last reduce portion of stage 0 ends on rank 0."""
    ends = [
        end
        for rank, stream, action, _, end in result.timeline.events
        if rank == 0 and stream == "data_parallel" and action.kind is Kind.REDUCE and action.stage == 0
    ]
    return max(ends)


def run(microbatch_counts: list[int]) -> list[dict]:
    cost = layer_costs()
    buckets = math.ceil(cost.weight_bytes / BUCKET_BYTES)
    variants = {
        "one reduce per stage": dict(reduce_portions=1),
        f"bucketed ({buckets} × 25 MiB, finishing order)": dict(reduce_portions=buckets, reduce_order="bucketed"),
        f"prioritised ({buckets} portions)": dict(reduce_portions=buckets, reduce_order="priority"),
    }
    rows = []
    for microbatches in microbatch_counts:
        for schedule in ("breadth-first", "depth-first, weights resident"):
            base = configurations(microbatches)[schedule]
            for (variant, options), placement in itertools.product(variants.items(), ("end", "early")):
                config = dataclasses.replace(base, step_placement=placement, **options)
                result = simulate(build_schedule(config, check=False), cost)
                rows.append(
                    {
                        "microbatches": microbatches,
                        "schedule": schedule,
                        "reduce": variant,
                        "steps": placement,
                        "stage0_ready": stage0_ready(result),
                        "step_time": result.step_time,
                        "next_step_adds": steady_step(config, cost),
                        "exposed_communication": result.to_json()["exposed_communication"],
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    rows = run(args.microbatches)
    today = date.today().isoformat()
    lines = [
        f"# Prioritised portions vs DDP-style buckets (simulated, {today})",
        "",
        "A third column of step time: what one more step adds when 3 consecutive steps are simulated (the next "
        "step's forwards wait for their stage's update and gather).",
        "",
        "| m | schedule | reduce | steps | stage 0 reduced at (s) | step time (s) | one more step adds (s) | "
        "exposed comm. (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['microbatches']} | {row['schedule']} | {row['reduce']} | {row['steps']} | "
            f"{row['stage0_ready']:.3f} | "
            f"{row['step_time']:.3f} | {row['next_step_adds']:.3f} | "
            f"{1000 * row['exposed_communication']:.0f} |"
        )
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores); simulated"
    print(write_results(args.output, "reduce_order", {"date": today, "machine": machine, "rows": rows}, lines))


if __name__ == "__main__":
    main()
