"""Mixed precision: bfloat16 trains like float32 within its rounding; float16's loss scaling survives an overflow.

Stages compute under autocast, pass their outputs in the compute dtype and
keep float32 weights, gradients and optimizer state.  float16 scales the
loss; a step whose gradients overflow (injected on one rank here) is skipped
by the guard on every rank, the scale halves and training goes on.
"""

from __future__ import annotations

import math

import pytest
import torch
from runtime_models import batch, mlp_layers
from torch import nn

import layerpipe
from layerpipe.knobs import ConfigError

STEPS = 8


def float_layers() -> list[nn.Module]:
    return [layer.float() for layer in mlp_layers()]


def train(
    precision: str, skip_nonfinite: bool = False, overflow_at: int | None = None, recompute: str = "none"
) -> dict:
    """Worker: train ``STEPS`` steps; optionally make one rank's gradients infinite at one step."""
    pipe = layerpipe.Pipeline(
        float_layers(),
        nn.functional.mse_loss,
        schedule="1f1b",
        microbatches=4,
        precision=precision,
        skip_nonfinite=skip_nonfinite,
        timeout=60,
        recompute=recompute,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
    )
    losses, scales, skipped = [], [], []
    for step in range(STEPS):
        handle = None
        if step == overflow_at and pipe.rank == 0:
            parameter = next(iter(pipe.stages.values())).layers[0].weight
            handle = parameter.register_hook(lambda gradient: gradient * float("inf"))
        inputs, targets = batch(16, seed=step + 1)
        losses.append(pipe.train_step(inputs.float(), targets.float()))
        scales.append(pipe.loss_scale)
        skipped.append(pipe.last_step_skipped)
        if handle is not None:
            handle.remove()
    dtypes = sorted({str(meta.dtype) for metas in pipe.shapes.agreed() for stage in metas if stage for meta in stage})
    weights = sorted({str(p.dtype) for p in pipe.parameters()})
    final = {name: value.detach().clone() for name, value in pipe.named_parameters()}
    return dict(losses=losses, scales=scales, skipped=skipped, dtypes=dtypes, weights=weights, final=final)


@pytest.mark.multiprocess
def test_bfloat16_passes_half_size_messages_keeps_float32_weights_and_trains_like_float32():
    full = layerpipe.launch(train, 2, ("fp32",))[0]
    half = layerpipe.launch(train, 2, ("bf16",))[0]
    assert half["dtypes"] == ["torch.bfloat16"] and half["weights"] == ["torch.float32"]
    assert half["losses"][-1] < half["losses"][0]
    assert all(abs(a - b) <= 0.05 * b for a, b in zip(half["losses"], full["losses"])), (half, full)


@pytest.mark.multiprocess
def test_float16_skips_an_overflowing_step_on_every_rank_halves_its_scale_and_trains_on():
    per_rank = layerpipe.launch(train, 2, ("fp16", True, 3))
    for result in per_rank:
        assert result["skipped"][3] is not None and all(s is None for i, s in enumerate(result["skipped"]) if i != 3)
        assert result["scales"][2] == 2.0**16 and result["scales"][3] == 2.0**15
        assert all(math.isfinite(loss) for loss in result["losses"]) and result["losses"][-1] < result["losses"][0]
    assert per_rank[0]["scales"] == per_rank[1]["scales"]


def refused(options: dict) -> str:
    try:
        layerpipe.Pipeline(float_layers(), nn.functional.mse_loss, microbatches=2, stages_per_rank=1, **options)
    except ConfigError as error:
        return str(error)
    return "accepted"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(precision="fp8"), "precision='fp8': choose one of fp32, bf16, fp16"),
        (dict(precision="fp16"), "precision='fp16': needs skip_nonfinite=True"),
        (
            dict(precision="fp16", schedule="async", skip_nonfinite=False),
            "precision='fp16': needs the guard of a flushed step for its loss scaling",
        ),
    ],
)
def test_precisions_that_cannot_run_are_refused_in_one_line(options, message):
    assert layerpipe.launch(refused, 1, (options,))[0].startswith(message)


@pytest.mark.multiprocess
def test_recomputation_in_bfloat16_replays_the_forward_in_bfloat16_and_changes_nothing():
    plain = layerpipe.launch(train, 2, ("bf16",))
    recomputed = layerpipe.launch(train, 2, ("bf16", False, None, "full"))
    for without, with_recompute in zip(plain, recomputed):
        assert with_recompute["losses"] == without["losses"]
        assert all(torch.equal(with_recompute["final"][name], value) for name, value in without["final"].items())


def train_async_in_bfloat16() -> dict:
    pipe = layerpipe.Pipeline(
        float_layers(),
        nn.functional.mse_loss,
        schedule="async",
        microbatches=4,
        update_every=2,
        precision="bf16",
        timeout=60,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
    )
    losses = [pipe.train_step(*(t.float() for t in batch(16, seed=step + 1))) for step in range(8)]
    pipe.flush()
    dtypes = sorted({str(meta.dtype) for metas in pipe.shapes.agreed() for stage in metas if stage for meta in stage})
    return dict(losses=losses, dtypes=dtypes, weights=sorted({str(p.dtype) for p in pipe.parameters()}))


@pytest.mark.multiprocess
def test_the_async_stream_runs_in_bfloat16():
    result = layerpipe.launch(train_async_in_bfloat16, 2)[0]
    assert result["dtypes"] == ["torch.bfloat16"] and result["weights"] == ["torch.float32"]
    assert all(math.isfinite(loss) for loss in result["losses"]) and result["losses"][-1] < result["losses"][0]
