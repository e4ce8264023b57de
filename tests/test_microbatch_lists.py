"""Micro-batches of different lengths, given as lists, train as one process trains on all of their tokens at once.

``train_step(list_of_microbatches, list_of_targets)``: each micro-batch has
its own sequence length and its own ignored targets (``-100``); the step's
loss is the mean over every counted token of the step, as
``cross_entropy`` on the whole step's tokens in one process gives it, and
the gradients are those of that loss.  Shown in float64 against a
single-process reference on the demo GPT, with global-norm clipping active
(limit below the norm): every flushed schedule on 2 ranks with the V-shape
placement and recomputation, some on 4 ranks, and 2 ranks × 2 replicas at
ZeRO 0–3 — losses, ``last_grad_norm``, evaluation losses and parameters
after several optimizer steps.  One launch per process count builds every
case's ``Pipeline`` in turn.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from runtime_models import Chain, relative_error
from test_clipping import flushed_cases
from torch import nn

import layerpipe
from layerpipe.models.config import GPTConfig
from layerpipe.models.gpt import gpt_layers, next_token_loss

STEPS, LIMIT, TOLERANCE = 3, 0.05, 1e-10
CONFIG = GPTConfig(vocab_size=11, block_size=12, width=8, heads=2, blocks=6)
MICROBATCHES = 4


def layers() -> list[nn.Module]:
    """Return the demo GPT's eight layers in float64."""
    return [layer.double() for layer in gpt_layers(CONFIG, seed=3)]


def _optimizer(parameters):
    """SGD with momentum: the update follows the clipped gradient, so a wrong weighting shows at once."""
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)


def microbatch_lists(step: int, count: int) -> tuple[list, list]:
    """Return ``count`` micro-batches of token ids, each of its own length and size, and their targets, some of
    them ignored (``-100``)."""
    generator = torch.Generator().manual_seed(100 + step)
    inputs, targets = [], []
    for index in range(count):
        samples, length = 1 + (index + step) % 2, 3 + (5 * index + step) % (CONFIG.block_size - 3)
        if step == 1:  # one shape, counts still differing: the agreed shapes, no header, weighted by counted tokens
            samples, length = 2, 6
        ids = torch.randint(0, CONFIG.vocab_size, (samples, length + 1), generator=generator)
        labels = ids[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=generator) < 0.3] = -100
        labels[0, 0] = ids[0, 1]  # at least one counted target
        inputs.append(ids[:, :-1])
        targets.append(labels)
    return inputs, targets


def step_loss(model: nn.Module, inputs: list, targets: list) -> torch.Tensor:
    """Return the mean cross-entropy over every counted token of the step's micro-batches, as one process."""
    logits = torch.cat([model(ids).reshape(-1, CONFIG.vocab_size) for ids in inputs])
    return nn.functional.cross_entropy(logits, torch.cat([t.reshape(-1) for t in targets]))


def reference(count: int) -> tuple[list, list, list, dict]:
    """Return one process's clipped losses and norms, its evaluation losses and its final parameters."""
    model = Chain(*copy.deepcopy(layers()))
    optimizer = _optimizer(model.parameters())
    losses, norms, evaluations = [], [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = step_loss(model, *microbatch_lists(step, count))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), LIMIT)))
        losses.append(float(loss.detach()))
        optimizer.step()
        with torch.no_grad():
            evaluations.append(float(step_loss(model, *microbatch_lists(10 + step, count))))
    return losses, norms, evaluations, {name: p.detach().clone() for name, p in model.named_parameters()}


def run_cases(cases: list[dict]) -> list[tuple]:
    """Worker: train every case ``STEPS`` steps on lists of micro-batches, evaluating after each step."""
    results = []
    for options in cases:
        options = {"microbatches": MICROBATCHES, **options}  # dualpipe-v's cases ask for the 2p it needs
        pipe = layerpipe.Pipeline(
            layers(), next_token_loss, clip_grad_norm=LIMIT, timeout=60, optimizer=_optimizer, **options,
        )  # fmt: skip
        count = options["microbatches"] * options.get("data_parallel", 1)
        losses, norms, evaluations = [], [], []
        for step in range(STEPS):
            losses.append(pipe.train_step(*microbatch_lists(step, count)))
            norms.append(pipe.last_grad_norm)
            evaluations.append(pipe.eval_step(*microbatch_lists(10 + step, count)))
        results.append((losses, norms, evaluations, pipe.gathered_state_dict()))
        pipe.close()  # its gloo groups' threads would outlive it
    return results


def check(processes: int, cases: list[dict]) -> None:
    """Run ``cases`` on ``processes`` processes and compare each with the single-process reference."""
    expected = {}
    per_process = layerpipe.launch(run_cases, processes, (cases,), timeout=600)
    for index, case in enumerate(cases):
        count = case.get("microbatches", MICROBATCHES) * case.get("data_parallel", 1)
        if count not in expected:
            expected[count] = reference(count)
        losses, norms, evaluations, parameters = expected[count]
        assert min(norms) > 4 * LIMIT, "every step clips"
        for found_losses, found_norms, found_evaluations, state in (results[index] for results in per_process):
            for found, wanted in zip(found_losses + found_norms + found_evaluations, losses + norms + evaluations):
                assert abs(found - wanted) <= TOLERANCE * abs(wanted), f"{case}: {found} != {wanted}"
            for name, value in state.items():
                error = relative_error(value, parameters[name])
                assert error <= TOLERANCE, f"{case}: {name} off by {error:.1e}"
        assert {name for row in per_process for name in row[index][3]} == set(parameters), f"{case}: all compared"


@pytest.mark.multiprocess
def test_two_ranks_train_on_microbatches_of_different_lengths_as_one_process_for_every_schedule():
    cases = flushed_cases(2) + [
        dict(schedule="breadth-first", placement="vshape"),
        dict(schedule="1f1b", recompute="full"),
        dict(schedule="zero-bubble", recompute="selective"),
    ]
    check(2, cases)


@pytest.mark.multiprocess
def test_four_ranks_and_two_replicas_at_every_zero_level_train_on_different_lengths_as_one_process():
    replicated = [dict(schedule="breadth-first", data_parallel=2, zero=zero) for zero in range(4)]
    pipelines = flushed_cases(4)  # every flushed schedule of the registry
    check(4, pipelines + replicated)


def refusals_then_a_step() -> tuple[list[str], float]:
    """Worker: what a pipeline says to each bad list (and async and ``forward`` to any list), then one good step."""
    pipe = layerpipe.Pipeline(layers(), next_token_loss, "1f1b", microbatches=2, timeout=60)
    inputs, targets = microbatch_lists(0, 2)
    short = [targets[0], targets[1][:, :-1]]
    bad = [
        (inputs, targets[:1]),
        (inputs, targets[0]),
        (inputs + inputs, targets + targets),
        (inputs, [targets[0], torch.cat([targets[1], targets[1]])]),
        (inputs, short),
        (inputs, [targets[0], torch.full_like(targets[1], -100)]),
    ]
    said = []
    for step in bad:
        for call in (pipe.train_step, pipe.eval_step):
            try:
                call(*step)
                said.append("accepted")
            except ValueError as error:
                said.append(str(error))
    try:
        pipe.forward(inputs)
    except ValueError as error:
        said.append(str(error))
    stream = layerpipe.Pipeline(layers(), next_token_loss, "async", microbatches=2, optimizer=_optimizer, timeout=60)
    try:
        stream.train_step(inputs, targets)
    except ValueError as error:
        said.append(str(error))
    return said, pipe.train_step(inputs, targets)


@pytest.mark.multiprocess
def test_bad_lists_are_refused_in_one_line_before_anything_runs():
    model = Chain(*copy.deepcopy(layers()))
    expected = float(step_loss(model, *microbatch_lists(0, 2)).detach())
    for said, loss in layerpipe.launch(refusals_then_a_step, 2, timeout=300):
        assert abs(loss - expected) <= TOLERANCE * expected, "after the refusals a step runs as if none came before"
        starts = [
            "targets: a list of 1, but 2 micro-batches of inputs",
            "targets: a Tensor, but the inputs are a list of micro-batches",
            "inputs: a list of 4 micro-batches; the step runs microbatches × data_parallel = 2",
            f"targets[1]: a batch of {2 * len(microbatch_lists(0, 2)[1][1])} samples, but inputs[1] has",
            "targets[1]: shape",
            "targets[1]: no counted target",
        ]
        for index, start in enumerate(starts):
            for found in said[2 * index : 2 * index + 2]:
                assert found.startswith(start) and "\n" not in found, f"{start!r}: {found!r}"
        assert said[-2] == "inputs: a list; forward takes one batch (a tensor, or a tuple of tensors)"
        assert said[-1].startswith("inputs: a list of micro-batches; schedule='async' streams sub-minibatches")
        assert len(said) == 2 * len(starts) + 2


def test_length_buckets_give_micro_batches_of_their_own_length_and_about_equal_tokens():
    from layerpipe.models.text import CharacterText
    from layerpipe.train.tasks import bucketed

    text = CharacterText.from_text("test", "abcdefghij" * 50)
    model = GPTConfig(vocab_size=10, block_size=16, length_buckets=4)
    inputs, targets = bucketed(text, 2, 12, model, torch.Generator().manual_seed(0))
    lengths = [ids.shape[1] for ids in inputs]
    assert set(lengths) <= {4, 8, 12, 16} and len(set(lengths)) > 2, lengths
    for ids, labels in zip(inputs, targets):
        assert ids.shape == labels.shape and ids.shape[0] == 2 * 16 // ids.shape[1]
        assert torch.equal(ids[:, 1:], labels[:, :-1]), "targets are the next characters"


@pytest.mark.multiprocess
def test_layerpipe_train_learns_on_length_buckets(tmp_path):
    small = "--width 32 --heads 2 --blocks 2 --block-size 32 --batch-size 16 --microbatches 4 --sample-length 10"
    command = [sys.executable, "-m", "layerpipe.cli", "train", *small.split(), "--steps", "20", "--learning-rate",
               "0.01", "--length-buckets", "4", "--output", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["length_buckets"] == 4 and len(summary["losses"]) == 20
    assert summary["final_loss"] < 0.85 * summary["first_loss"]
