"""The collectives a step executes are exactly the program's ``GATHER`` and ``REDUCE`` actions.

``breadth-first`` at ZeRO-3 (a weight buffer for each local stage, the
default) gathers every stage once and reduce-scatters it once per step
whatever the number of micro-batches; a depth-first order with one weight
buffer gathers again at every switch between stages, as its lowered program
says.  Counted by wrapping ``torch.distributed``'s
collectives in the worker processes (2 pipeline ranks × 2 replicas).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from runtime_models import batch, mlp_layers
from torch import nn

import layerpipe
from layerpipe.schedule.actions import Kind

COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_reduce",
)


def _counted_step(schedule: str, microbatches: int, weight_buffers: int | None) -> dict:
    pipe = layerpipe.Pipeline(
        mlp_layers(),
        nn.functional.mse_loss,
        schedule=schedule,
        microbatches=microbatches,
        stages_per_rank=2,
        data_parallel=2,
        zero=3,
        weight_buffers=weight_buffers,
        timeout=60,
    )
    inputs, targets = batch(2 * microbatches)
    pipe.train_step(inputs, targets)  # the first step also agrees on shapes, which gathers every stage once
    counts = dict.fromkeys(COLLECTIVES, 0)
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name):
        def collective(*args, **kwargs):
            if kwargs.get("group") is pipe.groups.data:
                counts[name] += 1
            return originals[name](*args, **kwargs)

        return collective

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        pipe.train_step(inputs, targets)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    program = pipe.schedule.programs[pipe.rank]
    return {
        "gathers": counts["all_gather_single"] + counts["all_gather_into_tensor"],
        "reduce_scatters": counts["reduce_scatter_single"] + counts["reduce_scatter_tensor"] + counts["reduce_scatter"],
        "all_reduces": counts["all_reduce"],
        "program_gathers": sum(action.kind is Kind.GATHER for action in program),
        "program_reduces": sum(action.kind is Kind.REDUCE for action in program),
        "stages": len(pipe.stages),
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("microbatches", [4, 8, 16])
def test_breadth_first_at_zero3_gathers_and_reduce_scatters_each_stage_once_per_step(microbatches):
    for process, counts in enumerate(layerpipe.launch(_counted_step, 4, ("breadth-first", microbatches, None))):
        assert counts["gathers"] == counts["stages"] == 2, f"process {process}: {counts}"
        assert counts["reduce_scatters"] == counts["stages"], f"process {process}: {counts}"
        assert counts["all_reduces"] == 0, f"process {process}: {counts}"


@pytest.mark.multiprocess
def test_a_depth_first_order_gathers_again_at_every_switch_as_its_program_says():
    for process, counts in enumerate(layerpipe.launch(_counted_step, 4, ("interleaved", 8, 1))):
        assert counts["gathers"] == counts["program_gathers"] > counts["stages"], f"process {process}: {counts}"
        assert counts["reduce_scatters"] == counts["program_reduces"] == counts["stages"], (
            f"process {process}: {counts}"
        )
