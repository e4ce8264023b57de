"""Pipeline × data parallelism at every ZeRO level equals a single-process float64 reference.

For each configuration: the loss of three AdamW steps, every gradient this
process reduces at every step, and the full parameters after the steps
(``gathered_state_dict``), relative error at most 1e-10 — for every
schedule, ``pipeline × data`` ∈ {1×2, 2×2, 4×1, 1×4}, ``zero`` 0–3, with and
without recomputation and portioned reduces.  One launch per layout runs
all of its configurations.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import layerpipe

from runtime_models import batch, mlp_layers, reference_run, relative_error

STEPS = 3
TOLERANCE = 1e-10
SCHEDULES = ("gpipe", "1f1b", "interleaved", "breadth-first", "grouped", "zero-bubble")


def configurations(pipeline: int, data: int) -> list[tuple]:
    """Return ``(schedule, zero, recompute, reduce portions)`` for one layout: the whole cross product."""
    zeros = (0, 1, 2, 3) if data > 1 else (0, 3)  # with one replica there is nothing to shard
    return list(itertools.product(SCHEDULES, zeros, ("none", "full"), (1, 3)))


def pipeline_options(schedule: str, pipeline: int) -> dict:
    """Return the schedule options used for ``schedule`` on ``pipeline`` ranks: ``m = 2p``, ``v = 2`` when looping."""
    microbatches = 2 * pipeline
    looping = schedule not in ("gpipe", "1f1b")
    return {"schedule": schedule, "microbatches": microbatches, "stages_per_rank": 2 if looping else 1,
            "group_size": pipeline + 1 if schedule == "grouped" else None}


def run_configurations(pipeline: int, data: int, cases: list[tuple]) -> list[tuple]:
    """Worker: train every case for ``STEPS`` steps; return the largest relative errors per case."""
    results = []
    for schedule, zero, recompute, portions in cases:
        options = pipeline_options(schedule, pipeline)
        samples = options["microbatches"] * data * 2
        layers = mlp_layers()
        expected_losses, expected_grads, expected_params = reference_run(layers, STEPS, samples)
        pipe = layerpipe.Pipeline(layers, nn.functional.mse_loss, data_parallel=data, zero=zero, recompute=recompute,
                                  reduce_portions=portions, **options,
                                  optimizer=lambda params: torch.optim.AdamW(params, lr=0.05), timeout=60)
        loss_error = grad_error = 0.0
        for step in range(STEPS):
            inputs, targets = batch(samples, seed=step + 1)
            loss = pipe.train_step(inputs, targets)
            loss_error = max(loss_error, abs(loss - expected_losses[step]) / abs(expected_losses[step]))
            for shard in pipe.shards.values():
                ranges = {name: (start, end) for name, start, end in shard.shard_ranges()}
                for name, gradient in shard.local_gradients():
                    expected = expected_grads[step][name]
                    if zero >= 2 and data > 1:
                        start, end = ranges[name]
                        expected = expected.reshape(-1)[start:end]
                    if expected.numel():
                        grad_error = max(grad_error, relative_error(gradient.reshape(expected.shape), expected))
        state = pipe.gathered_state_dict()
        param_error = max((relative_error(state[name], expected_params[name]) for name, _ in
                           pipe.named_parameters()), default=0.0)
        names = sorted(state)
        results.append(((schedule, zero, recompute, portions), loss_error, grad_error, param_error, names))
    return results


LAYOUTS = [(1, 2), (2, 2), (4, 1), (1, 4)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("pipeline, data", LAYOUTS, ids=[f"{p}x{d}" for p, d in LAYOUTS])
def test_every_schedule_and_zero_level_matches_the_single_process_reference(pipeline, data):
    cases = configurations(pipeline, data)
    per_process = layerpipe.launch(run_configurations, pipeline * data, (pipeline, data, cases), timeout=600)
    expected_names = sorted(dict(nn.Sequential(*mlp_layers()).named_parameters()))
    for index, case in enumerate(cases):
        rows = [results[index] for results in per_process]
        for replica in range(data):
            names = sorted(name for rank in range(pipeline) for name in rows[rank * data + replica][4])
            assert names == expected_names, f"{case}: every parameter lives on exactly one rank of each replica"
        for process, (_, loss_error, grad_error, param_error, _) in enumerate(rows):
            assert loss_error <= TOLERANCE, f"{pipeline}x{data} {case} process {process}: loss error {loss_error:.2e}"
            assert grad_error <= TOLERANCE, f"{pipeline}x{data} {case} process {process}: gradient error {grad_error:.2e}"
            assert param_error <= TOLERANCE, f"{pipeline}x{data} {case} process {process}: parameter error {param_error:.2e}"
