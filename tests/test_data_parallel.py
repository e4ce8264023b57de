"""Pipeline × data parallelism at every ZeRO level equals a single-process float64 reference.

For each configuration: the loss of three AdamW steps, every gradient this
process reduces at every step, and the full parameters after the steps
(``gathered_state_dict``), relative error at most 1e-10 — for every
schedule, ``pipeline × data`` ∈ {1×2, 2×2, 4×1, 1×4}, ``zero`` 0–3, with and
without recomputation and portioned reduces; and the V-shape placement
(whose last stage, and so its loss, is on pipeline rank 0) on 2×2.  One launch per layout runs
all of its configurations.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from runtime_models import batch, mlp_layers, reference_loss, reference_run, relative_error
from torch import nn

import layerpipe
from layerpipe.schedule.actions import Kind
from layerpipe.schedule.config import ONE_STAGE_SCHEDULES
from layerpipe.schedule.config import SCHEDULES as REGISTERED
from layerpipe.schedule.registry import schedule_record

STEPS = 3
TOLERANCE = 1e-10
SCHEDULES = tuple(name for name in REGISTERED if not schedule_record(name).streams)
"""Every registered schedule that flushes each step (the async stream updates at ZeRO 0 or 1 only, tested apart)."""


def configurations(pipeline: int, data: int) -> list[tuple]:
    """Return ``(schedule, zero, recompute, reduce portions)`` for one layout: the whole cross product."""
    zeros = (0, 1, 2, 3) if data > 1 else (0,)  # with one replica there is nothing to shard (and zero > 0 is refused)
    portions = (1, 3) if data > 1 else (1,)
    return list(itertools.product(SCHEDULES, zeros, ("none", "full"), portions))


def pipeline_options(schedule: str, pipeline: int) -> dict:
    """Return the schedule options used for ``schedule`` on ``pipeline`` ranks: ``m = 2p``, ``v = 2`` when looping."""
    microbatches = 2 * pipeline
    looping = schedule not in ONE_STAGE_SCHEDULES
    return {
        "schedule": schedule,
        "microbatches": microbatches,
        "stages_per_rank": 2 if looping else 1,
        "group_size": pipeline + 1 if "group_size" in schedule_record(schedule).options else None,
    }


def run_configurations(
    pipeline: int, data: int, cases: list[tuple], placement: str = "auto", extra: dict | None = None
) -> list[tuple]:
    """Worker: train every case for ``STEPS`` steps, then evaluate; return the largest relative errors per case.

    Also returns whether the evaluation ran ``GATHER`` actions (from its program, at ZeRO-3).
    """
    results = []
    for schedule, zero, recompute, portions in cases:
        options = {**pipeline_options(schedule, pipeline), "placement": placement, **(extra or {})}
        samples = options["microbatches"] * data * 2
        layers = mlp_layers()
        expected_losses, expected_grads, expected_params = reference_run(layers, STEPS, samples)
        pipe = layerpipe.Pipeline(
            layers,
            nn.functional.mse_loss,
            data_parallel=data,
            zero=zero,
            recompute=recompute,
            reduce_portions=portions,
            **options,
            optimizer=lambda params: torch.optim.AdamW(params, lr=0.05),
            timeout=60,
        )
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
        inputs, targets = batch(samples, seed=99)
        expected_eval = reference_loss(mlp_layers(), expected_params, inputs, targets)  # the pipeline owns `layers` now
        eval_error = abs(pipe.eval_step(inputs, targets) - expected_eval) / expected_eval
        eval_gathers = any(event[2].kind is Kind.GATHER for event in pipe.last_result.events)
        state = pipe.gathered_state_dict()
        param_error = max(
            (relative_error(state[name], expected_params[name]) for name, _ in pipe.named_parameters()), default=0.0
        )
        names = sorted(state)
        pipe.close()  # each case's groups go: hundreds of cases would keep thousands of gloo threads
        results.append(
            (
                (schedule, zero, recompute, portions),
                max(loss_error, eval_error),
                grad_error,
                param_error,
                names,
                eval_gathers,
            )
        )
    return results


LAYOUTS = [(1, 2), (2, 2), (4, 1), (1, 4)]


def check_results(pipeline: int, data: int, cases: list[tuple], per_process: list[list[tuple]]) -> None:
    """Assert every case of every process matched the reference: parameters placed once, errors within tolerance."""
    expected_names = sorted(dict(nn.Sequential(*mlp_layers()).named_parameters()))
    for index, case in enumerate(cases):
        rows = [results[index] for results in per_process]
        for replica in range(data):
            names = sorted(name for rank in range(pipeline) for name in rows[rank * data + replica][4])
            assert names == expected_names, f"{case}: every parameter lives on exactly one rank of each replica"
        for process, (_, loss_error, grad_error, param_error, _, eval_gathers) in enumerate(rows):
            assert loss_error <= TOLERANCE, f"{pipeline}x{data} {case} process {process}: loss error {loss_error:.2e}"
            assert grad_error <= TOLERANCE, (
                f"{pipeline}x{data} {case} process {process}: gradient error {grad_error:.2e}"
            )
            assert param_error <= TOLERANCE, (
                f"{pipeline}x{data} {case} process {process}: parameter error {param_error:.2e}"
            )
            sharded = case[1] == 3 and data > 1
            assert eval_gathers == sharded, f"{case}: evaluation gathers weights from its program exactly at ZeRO-3"


@pytest.mark.multiprocess
@pytest.mark.parametrize("pipeline, data", LAYOUTS, ids=[f"{p}x{d}" for p, d in LAYOUTS])
def test_every_schedule_and_zero_level_matches_the_single_process_reference(pipeline, data):
    cases = configurations(pipeline, data)
    per_process = layerpipe.launch(run_configurations, pipeline * data, (pipeline, data, cases), timeout=600)
    check_results(pipeline, data, cases, per_process)


@pytest.mark.multiprocess
def test_vshape_placement_with_data_parallelism_matches_the_reference_on_every_replica():
    """The V-shape puts the last stage on pipeline rank 0: the loss is averaged over that rank's replicas."""
    cases = list(itertools.product(("breadth-first",), (0, 1, 2, 3), ("none", "full"), (1, 3)))
    per_process = layerpipe.launch(run_configurations, 4, (2, 2, cases, "vshape"), timeout=600)
    check_results(2, 2, cases, per_process)


@pytest.mark.multiprocess
def test_early_optimizer_steps_match_the_reference_at_every_zero_level():
    """Each stage steps after the next stage's reduce; with three stages per rank some step mid-program."""
    cases = list(itertools.product(("interleaved", "breadth-first", "zero-bubble"), (0, 1, 2, 3), ("none",), (1, 3)))
    extra = {"step_placement": "early", "stages_per_rank": 3}
    per_process = layerpipe.launch(run_configurations, 4, (2, 2, cases, "auto", extra), timeout=600)
    check_results(2, 2, cases, per_process)


@pytest.mark.multiprocess
def test_reduces_after_the_flush_match_the_reference_at_every_zero_level():
    """Megatron-LM's order: every stage's reduce once the rank's backward is over (whole and in portions)."""
    cases = list(
        itertools.product(
            ("1f1b", "interleaved", "breadth-first", "zero-bubble"), (0, 1, 2, 3), ("none", "full"), (1, 3)
        )
    )
    per_process = layerpipe.launch(
        run_configurations, 4, (2, 2, cases, "auto", {"reduce_order": "after-flush"}), timeout=600
    )
    check_results(2, 2, cases, per_process)
