"""Every schedule on real gloo processes equals a single-process float64 reference.

For each configuration: the loss and every gradient of three AdamW steps
and the parameters after them, relative error at most 1e-10.  One launch per
rank count runs all configurations, so processes start once.
"""

from __future__ import annotations

import pytest
import torch
from runtime_models import batch, mlp_layers, multi_tensor_layers, reference_run, relative_error
from torch import nn

import layerpipe
from layerpipe.schedule.config import SCHEDULES, ConfigError, ScheduleConfig, validate_config
from layerpipe.schedule.registry import schedule_record

STEPS = 3
TOLERANCE = 1e-10
MODELS = {"mlp": mlp_layers, "multi-tensor": multi_tensor_layers}
FLUSHED = tuple(name for name in SCHEDULES if not schedule_record(name).streams)
"""Every registered schedule that flushes each step (the async stream has its own tests)."""


def configurations(ranks: int) -> list[tuple]:
    """Return ``(schedule, v, m, group size, model)`` for every valid combination tested on ``ranks`` ranks."""
    found = []
    for schedule in FLUSHED:
        for v in (1, 2):
            for m in sorted({ranks, 2 * ranks, ranks + 1, 3}):
                takes_group = "group_size" in schedule_record(schedule).options
                groups = sorted({ranks, m, (ranks + m) // 2}) if takes_group else [None]
                for group_size in groups:
                    config = ScheduleConfig(schedule, ranks, m, v, group_size=group_size)
                    try:
                        validate_config(config)
                    except ConfigError:
                        continue
                    found.append((schedule, v, m, group_size, "mlp"))
    return found


def run_configurations(cases: list[tuple]) -> list[tuple]:
    """Worker: train every case for ``STEPS`` AdamW steps; return the largest relative errors per case."""
    results = []
    for schedule, v, m, group_size, model in cases:
        layers = MODELS[model]()
        expected_losses, expected_grads, expected_params = reference_run(layers, STEPS, 2 * m)
        pipe = layerpipe.Pipeline(
            layers,
            nn.functional.mse_loss,
            schedule=schedule,
            microbatches=m,
            stages_per_rank=v,
            group_size=group_size,
            optimizer=lambda params: torch.optim.AdamW(params, lr=0.05),
            timeout=60,
        )
        loss_error = grad_error = 0.0
        names = set()
        for step in range(STEPS):
            inputs, targets = batch(2 * m, seed=step + 1)
            loss = pipe.train_step(inputs, targets)
            loss_error = max(loss_error, abs(loss - expected_losses[step]) / abs(expected_losses[step]))
            for name, parameter in pipe.named_parameters():
                names.add(name)
                grad_error = max(grad_error, relative_error(parameter.grad, expected_grads[step][name]))
        param_error = (
            max(relative_error(p.detach(), expected_params[n]) for n, p in pipe.named_parameters()) if names else 0.0
        )
        results.append(((schedule, v, m, group_size, model), loss_error, grad_error, param_error, sorted(names)))
        pipe.close()  # its gloo groups' threads would outlive it
    return results


def check(ranks: int, cases: list[tuple]) -> None:
    per_rank = layerpipe.launch(run_configurations, ranks, (cases,), timeout=120)
    for index, case in enumerate(cases):
        rows = [results[index] for results in per_rank]
        names = [name for row in rows for name in row[4]]
        expected = dict(nn.Sequential(*MODELS[case[4]]()).named_parameters())
        assert sorted(names) == sorted(expected), f"{case}: every parameter lives on exactly one rank"
        for rank, (_, loss_error, grad_error, param_error, _) in enumerate(rows):
            assert loss_error <= TOLERANCE, f"{case} rank {rank}: loss relative error {loss_error:.2e}"
            assert grad_error <= TOLERANCE, f"{case} rank {rank}: gradient relative error {grad_error:.2e}"
            assert param_error <= TOLERANCE, f"{case} rank {rank}: parameter relative error {param_error:.2e}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_every_schedule_matches_the_single_process_reference(ranks):
    cases = configurations(ranks)
    assert {case[0] for case in cases} == set(FLUSHED)
    check(ranks, cases)


@pytest.mark.multiprocess
def test_stages_passing_several_tensors_of_changing_shapes_match_the_reference():
    cases = [
        (schedule, v, 4, None, "multi-tensor")
        for schedule, v in (("breadth-first", 2), ("interleaved", 2), ("zero-bubble", 1), ("1f1b", 1))
    ]
    check(2, cases)


def test_the_reference_run_is_sensitive_to_a_wrong_gradient():
    """The tolerance is meaningful: halving one micro-batch's contribution is far above it."""
    layers = mlp_layers()
    _, grads, _ = reference_run(layers, 1, 4)
    inputs, targets = batch(4, seed=1)
    model = nn.Sequential(*layers)
    halves = [nn.functional.mse_loss(model(x), y) for x, y in zip(inputs.chunk(2), targets.chunk(2))]
    (halves[0] / 2 + halves[1] / 4).backward()
    name = "0.weight"
    assert relative_error(dict(model.named_parameters())[name].grad, grads[0][name]) > 1e-3
