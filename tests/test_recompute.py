"""Activation recomputation in the runtime: when ``R`` runs, what it saves, and that it changes no number.

* every recompute of micro-batch ``i`` starts after the loss gradient of
  ``i`` was computed on the last stage (measured timeline, all ranks);
* recomputation lowers the measured peak of saved activation bytes by the
  factor the simulator's memory model predicts from the measured per-stage
  sizes (within 10 %);
* the reference GPT with ``full`` and ``selective`` recomputation gives the
  float64 reference's gradients and parameters, and selective keeps less
  than nothing-recomputed and more than full.
"""

from __future__ import annotations

import pytest
import torch
from runtime_models import Chain, batch, relative_error, wide_layers
from torch import nn

import layerpipe
from layerpipe.models.gpt import GPTConfig, gpt_layers, next_token_loss
from layerpipe.schedule.actions import Kind
from layerpipe.sim.memory import activation_peak

STAGES = 4
PARTITION = [0, 5, 10, 15]


def _recompute_timeline(schedule: str, stages_per_rank: int):
    pipe = layerpipe.Pipeline(
        wide_layers(),
        nn.functional.mse_loss,
        schedule=schedule,
        microbatches=4,
        stages_per_rank=stages_per_rank,
        partition=PARTITION if stages_per_rank == 2 else [0, 10],
        recompute="full",
        timeout=60,
    )
    inputs, targets = batch(8, width=8)
    pipe.train_step(inputs, targets)
    return pipe.timeline().events


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule, stages_per_rank", [("1f1b", 1), ("breadth-first", 2), ("interleaved", 2)])
def test_the_loss_gradient_of_a_microbatch_precedes_every_recompute_of_it(schedule, stages_per_rank):
    rows = layerpipe.launch(_recompute_timeline, 2, (schedule, stages_per_rank))[0]
    last = 2 * stages_per_rank - 1
    loss_gradient_end = {}
    recomputes = []
    for _, _, action, start, end in rows:
        if action.kind is Kind.B and action.stage == last:
            loss_gradient_end[action.microbatch] = end
        elif action.kind is Kind.R:
            recomputes.append((action.stage, action.microbatch, start))
    assert len(recomputes) == last * 4, "every stage but the last recomputes every micro-batch once"
    for stage, microbatch, start in recomputes:
        assert start >= loss_gradient_end[microbatch], (
            f"{stage}R{microbatch} started before the loss gradient of micro-batch {microbatch}"
        )


def _peaks(recompute: str):
    pipe = layerpipe.Pipeline(
        wide_layers(),
        nn.functional.mse_loss,
        schedule="breadth-first",
        microbatches=4,
        stages_per_rank=2,
        partition=PARTITION,
        recompute=recompute,
        track_memory=True,
        timeout=60,
    )
    inputs, targets = batch(32, width=8)
    pipe.train_step(inputs, targets)
    memory = pipe.memory()
    return (
        memory["activations"],
        memory["forward_activations"],
        pipe.schedule.programs[pipe.rank],
        pipe.schedule.config.recomputed_stages,
    )


def _both_peaks():
    return _peaks("none"), _peaks("full")


@pytest.mark.multiprocess
def test_recomputation_lowers_the_measured_activation_peak_by_the_predicted_factor():
    for rank, (plain, recomputed) in enumerate(layerpipe.launch(_both_peaks, 2)):
        plain_peak, stored, plain_program, _ = plain
        recomputed_peak, inputs_only, recompute_program, recomputed_stages = recomputed
        activation = [stored.get(s, 0) for s in range(STAGES)]
        kept = [inputs_only.get(s, 0) for s in range(STAGES)]
        predicted = (
            activation_peak(recompute_program, activation, kept, frozenset(recomputed_stages)).bytes
            / activation_peak(plain_program, activation, kept).bytes
        )
        measured = recomputed_peak / plain_peak
        assert any(a.kind is Kind.R for a in recompute_program)
        assert measured < 0.6, f"rank {rank}: recomputation should shrink the peak ({measured:.2f})"
        assert abs(measured - predicted) <= 0.1 * predicted, (
            f"rank {rank}: measured factor {measured:.3f}, memory model {predicted:.3f}"
        )


GPT = GPTConfig(vocab_size=11, block_size=32, width=16, heads=4, blocks=2)  # attention weights dominate: selective pays


def _gpt_batch(step: int):
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, GPT.vocab_size, (8, GPT.block_size + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def _gpt_reference(steps: int):
    model = Chain(*[layer.double() for layer in gpt_layers(GPT)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(steps):
        inputs, targets = _gpt_batch(step)
        optimizer.zero_grad()
        next_token_loss(model(inputs), targets).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
    return grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def _gpt_run(recompute: str):
    expected_grads, expected_params = _gpt_reference(2)
    pipe = layerpipe.Pipeline(
        [layer.double() for layer in gpt_layers(GPT)],
        next_token_loss,
        schedule="breadth-first",
        microbatches=4,
        stages_per_rank=2,
        recompute=recompute,
        track_memory=True,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        timeout=60,
    )
    for step in range(2):
        pipe.train_step(*_gpt_batch(step))
    grad_error = max(relative_error(p.grad, expected_grads[name]) for name, p in pipe.named_parameters())
    param_error = max(relative_error(p.detach(), expected_params[name]) for name, p in pipe.named_parameters())
    return grad_error, param_error, pipe.memory()["activations"]


def _gpt_runs():
    return {mode: _gpt_run(mode) for mode in ("none", "selective", "full")}


@pytest.mark.multiprocess
def test_selective_and_full_recomputation_of_the_gpt_change_no_number_and_keep_less():
    for rank, runs in enumerate(layerpipe.launch(_gpt_runs, 2)):
        for mode, (grad_error, param_error, _) in runs.items():
            assert grad_error <= 1e-10, f"rank {rank} {mode}: gradient error {grad_error:.2e}"
            assert param_error <= 1e-10, f"rank {rank} {mode}: parameter error {param_error:.2e}"
        if rank == 0:  # rank 1 holds the last stage, which never recomputes
            assert runs["full"][2] < runs["selective"][2] < runs["none"][2], runs


def test_marked_regions_of_copied_or_pickled_layers_belong_to_the_copy():
    import copy
    import pickle

    from layerpipe.runtime.recompute import mark_regions

    model = nn.Sequential(*gpt_layers(GPTConfig(vocab_size=10, block_size=8, width=16, heads=2, blocks=2, dropout=0.5)))
    assert mark_regions(model) == 2 and mark_regions(model) == 2, "one region per block, marked once"
    ids = torch.randint(0, 10, (2, 8))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(block.attention.forward.module is block.attention for block in twin[1:3])
        twin.eval()  # only the copy: its attention dropout must follow it, not the original still in training mode
        assert torch.equal(twin(ids), twin(ids))
