"""Learning-rate schedulers: one per stage optimizer, stepped exactly when it steps, checkpointed and resumed bit for bit.

``Pipeline(..., scheduler=fn)`` calls ``fn(optimizer)`` for every stage
optimizer.  Shown in float64: a 2-rank pipeline with SGD and a warm-up then
step-decay scheduler equals one process with the same optimizer and
scheduler (losses, parameters and every stage's learning rate); a run saved
after step ``k`` and resumed into a fresh pipeline ends bit for bit equal
to the straight run; a step the guard skips does not advance the
scheduler; the async stream steps a stage's scheduler after each of its
updates; and bad schedulers are refused in one line before anything runs.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from runtime_models import Chain, batch, mlp_layers
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, SequentialLR, StepLR

import layerpipe
from layerpipe.checkpoint_files import CheckpointError
from layerpipe.runtime.checkpoint import load_checkpoint, save_checkpoint
from layerpipe.runtime.schedulers import load_scheduler_states, scheduler_states
from layerpipe.runtime.stream.delay import corrected_step
from layerpipe.schedule.config import ConfigError

STEPS, SAVED_AT, SAMPLES = 6, 3, 8


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)


def warmup_then_decay(optimizer):
    """Three steps of linear warm-up, then the rate halves every second step (a scheduler holding two)."""
    warmup = LambdaLR(optimizer, lambda step: (step + 1) / 3)
    return SequentialLR(optimizer, [warmup, StepLR(optimizer, step_size=2, gamma=0.5)], milestones=[3])


def decay(optimizer):
    return LambdaLR(optimizer, lambda step: 0.9**step)


def pipeline(**options) -> layerpipe.Pipeline:
    return layerpipe.Pipeline(
        mlp_layers(),
        nn.functional.mse_loss,
        **{"schedule": "breadth-first", "microbatches": 4, "optimizer": sgd, "timeout": 60, **options},
    )


def rates(pipe) -> dict[int, float]:
    return {index: optimizer.param_groups[0]["lr"] for index, optimizer in pipe.optimizers.items()}


def train(pipe, steps: range) -> tuple[list[float], list[dict]]:
    losses, seen = [], []
    for step in steps:
        losses.append(pipe.train_step(*batch(SAMPLES, seed=step + 1)))
        seen.append(rates(pipe))
    return losses, seen


def straight(folder: str) -> dict:
    """Worker: train ``STEPS`` steps with the scheduler, saving a checkpoint after ``SAVED_AT``."""
    pipe = pipeline(stages_per_rank=2, scheduler=warmup_then_decay)
    losses, seen = train(pipe, range(SAVED_AT))
    save_checkpoint(pipe, folder, {"step": SAVED_AT})
    more, later = train(pipe, range(SAVED_AT, STEPS))
    return dict(
        losses=losses + more,
        rates=seen + later,
        weights=pipe.gathered_state_dict(),
        states=scheduler_states(pipe.schedulers),
    )


def resumed(folder: str) -> dict:
    """Worker: load the checkpoint into a fresh pipeline and train the remaining steps."""
    pipe = pipeline(stages_per_rank=2, scheduler=warmup_then_decay)
    load_checkpoint(pipe, folder)
    losses, seen = train(pipe, range(SAVED_AT, STEPS))
    return dict(losses=losses, rates=seen, weights=pipe.gathered_state_dict(), states=scheduler_states(pipe.schedulers))


def one_process(steps: int) -> tuple[list[float], list[float], dict]:
    """Return the single-process losses, learning rates and final parameters with the same optimizer and scheduler."""
    model = Chain(*copy.deepcopy(mlp_layers()))
    optimizer = sgd(model.parameters())
    scheduler = warmup_then_decay(optimizer)
    losses, seen = [], []
    for step in range(steps):
        inputs, targets = batch(SAMPLES, seed=step + 1)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        seen.append(optimizer.param_groups[0]["lr"])
    return losses, seen, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("schedulers") / f"step-{SAVED_AT}")
    return folder, layerpipe.launch(straight, 2, (folder,), timeout=120)


@pytest.mark.multiprocess
def test_two_ranks_with_a_scheduler_equal_one_process(straight_run):
    _, per_process = straight_run
    losses, lrs, parameters = one_process(STEPS)
    assert per_process[0]["losses"] == pytest.approx(losses, rel=1e-12)
    for result in per_process:
        assert len(result["rates"][0]) == 2, "each rank schedules its two stages"
        assert [sorted(set(step.values())) for step in result["rates"]] == [[lr] for lr in lrs]
    weights = {name: value for result in per_process for name, value in result["weights"].items()}
    for name, expected in parameters.items():
        assert torch.allclose(weights[name], expected, rtol=1e-10, atol=1e-12), name
    assert lrs[0] < lrs[1] > lrs[-1], "the rate rose in the warm-up and fell in the decay"


@pytest.mark.multiprocess
def test_a_resumed_run_ends_bit_for_bit_equal_to_the_straight_run(straight_run):
    folder, per_process = straight_run
    saved = [json.load(open(os.path.join(folder, f"process-{n}.json")))["schedulers"] for n in range(2)]
    assert [sorted(states) for states in saved] == [["0", "2"], ["1", "3"]], "each process saves its stages'"
    again = layerpipe.launch(resumed, 2, (folder,), timeout=120)
    for first, second in zip(per_process, again):
        assert second["losses"] == first["losses"][SAVED_AT:]
        assert second["rates"] == first["rates"][SAVED_AT:]
        assert second["states"] == first["states"]
        assert sorted(second["weights"]) == sorted(first["weights"])
        assert all(torch.equal(second["weights"][name], value) for name, value in first["weights"].items())


def guarded(options: dict) -> list[tuple]:
    """Worker: four guarded steps; in the second a gradient is NaN. Return each step's skip, rates and epochs."""
    pipe = pipeline(schedule="gpipe", scheduler=decay, **options)
    seen = []
    for step in range(4):
        handle = None
        if step == 1 and pipe.rank == 1:
            parameter = next(iter(pipe.stages.values())).layers[0].weight
            handle = parameter.register_hook(lambda gradient: gradient * float("nan"))
        pipe.train_step(*batch(SAMPLES, seed=step + 1))
        seen.append((pipe.last_step_skipped, rates(pipe), {i: s.last_epoch for i, s in pipe.schedulers.items()}))
        if handle is not None:
            handle.remove()
    return seen


@pytest.mark.multiprocess
@pytest.mark.parametrize("options", [dict(skip_nonfinite=True), dict(clip_grad_norm=1.0)], ids=["guard", "clip"])
def test_a_skipped_step_does_not_advance_the_scheduler(options):
    for rows in layerpipe.launch(guarded, 2, (options,), timeout=120):
        assert [skipped is not None for skipped, _, _ in rows] == [False, True, False, False]
        epochs = [set(epoch.values()) for _, _, epoch in rows]
        assert epochs == [{1}, {1}, {2}, {3}], "the scheduler steps when its optimizer steps, not for the skipped step"
        assert [set(lr.values()) for _, lr, _ in rows] == [{0.1 * 0.9**n} for n in (1, 1, 2, 3)]


def streamed() -> list[dict]:
    """Worker: async calls with an update every two backwards; after each, every stage's updates and rates."""
    pipe = pipeline(schedule="async", update_every=2, scheduler=decay)
    seen = []
    for call in range(3):
        pipe.train_step(*batch(SAMPLES, seed=call + 1))
        seen.append({index: (pipe.executor.versions[index].version, lr) for index, lr in rates(pipe).items()})
    pipe.flush()
    seen.append({index: (pipe.executor.versions[index].version, lr) for index, lr in rates(pipe).items()})
    return seen


@pytest.mark.multiprocess
def test_async_steps_each_stages_scheduler_after_each_of_its_updates():
    updates = set()
    for rows in layerpipe.launch(streamed, 2, timeout=120):
        for row in rows:
            for version, lr in row.values():
                updates.add(version)
                assert lr == 0.1 * 0.9**version, "the rate has decayed once per update of the stage"
    assert len(updates) > 2, "the stages updated several times"


def test_a_spike_compensated_update_counts_as_the_optimizers_step_for_its_scheduler():
    parameter = nn.Parameter(torch.ones(2, dtype=torch.float64))
    parameter.grad = torch.ones(2, dtype=torch.float64)
    optimizer = sgd([parameter])
    scheduler = decay(optimizer)
    corrected_step(optimizer, "spike", 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.1 * 0.9


class Broken:
    def __call__(self, optimizer):
        raise ValueError("no warm-up\ngiven")


def refusals() -> list[str]:
    """Worker: what ``Pipeline`` says to each bad scheduler."""
    bad = [
        dict(scheduler=3),
        dict(scheduler=decay, optimizer=None),
        dict(scheduler=Broken()),
        dict(scheduler=lambda optimizer: {"lr": 0.1}),
        dict(scheduler=lambda optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)),
        dict(scheduler=lambda optimizer: decay(sgd([nn.Parameter(torch.zeros(1))]))),
    ]
    said = []
    for options in bad:
        try:
            pipeline(schedule="1f1b", microbatches=2, **options)
            said.append("accepted")
        except ConfigError as error:
            said.append(str(error))
    return said


@pytest.mark.multiprocess
def test_bad_schedulers_are_refused_in_one_line():
    said = layerpipe.launch(refusals, 1, timeout=120)[0]
    valid = "give a callable(optimizer) -> torch.optim.lr_scheduler.LRScheduler built on the optimizer it is given"
    assert said == [
        f"scheduler=3: not callable: {valid}",
        "scheduler=decay: needs optimizer: a scheduler sets the learning rate of a stage optimizer",
        f"scheduler=Broken: raised ValueError(no warm-up given) for stage 0; {valid}",
        f"scheduler=refusals.<locals>.<lambda>: returned dict for stage 0; {valid}",
        "scheduler=refusals.<locals>.<lambda>: returned ReduceLROnPlateau for stage 0, which steps on a metric the "
        "pipeline does not pass; use a scheduler stepped by steps alone (LambdaLR, StepLR, CosineAnnealingLR, "
        "SequentialLR, ...)",
        f"scheduler=refusals.<locals>.<lambda>: returned a scheduler of another optimizer for stage 0; {valid}",
    ]
    assert all("\n" not in line for line in said)


def test_a_checkpoint_without_a_stages_scheduler_state_is_refused_and_json_holds_the_state_exactly():
    optimizer = sgd([nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    scheduler = warmup_then_decay(optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    states = json.loads(json.dumps(scheduler_states({1: scheduler})))
    fresh = warmup_then_decay(sgd([nn.Parameter(torch.zeros(2, dtype=torch.float64))]))
    load_scheduler_states({1: fresh}, states, "here")
    assert scheduler_states({1: fresh}) == scheduler_states({1: scheduler})
    with pytest.raises(CheckpointError, match=r"^checkpoint here: no scheduler state for stage 0 \(saved without"):
        load_scheduler_states({0: fresh}, states, "here")
