"""What changes against one process: replicas start equal, buffers follow replica 0, modes are PyTorch's.

Float64 runs against a single-process reference doing the same gradient
accumulation: replicas seeded differently end equal to the reference started
from replica 0's weights at ZeRO 0–3; a model with BatchNorm trains and
evaluates equal to one process (running statistics, ``num_batches_tracked``
and evaluation losses included) with 1 and several micro-batches; with
dropout, two identical ``eval_step`` calls are equal and change no buffer;
``train_step`` without an optimizer warns once.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from runtime_models import relative_error
from torch import nn

import layerpipe
from layerpipe.runtime.replicas import NO_OPTIMIZER
from layerpipe.train.config import build_parser, config_from

STEPS = 3
TOLERANCE = 1e-10
SAMPLES = 8


def batchnorm_layers(seed: int, dropout: float = 0.0) -> list[nn.Module]:
    """Return float64 layers with two BatchNorms (running statistics drawn from ``seed`` too) and optional dropout."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh()]
    layers += [nn.Dropout(dropout), nn.Linear(8, 3)] if dropout else [nn.Linear(8, 3)]
    for layer in layers:
        if isinstance(layer, nn.BatchNorm1d):
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 1.5)
    return [layer.double() for layer in layers]


def data(seed: int, samples: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a float64 batch of inputs (width 6) and regression targets (width 3)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 6, dtype=torch.float64, generator=generator)
    return inputs, torch.randn(samples, 3, dtype=torch.float64, generator=generator)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def reference_step(model: nn.Module, optimizer, inputs, targets, microbatches: int, replicas: int) -> float:
    """One process's gradient accumulation over every replica's micro-batches; return the mean loss.

    Replica ``d`` takes the ``d``-th contiguous share; the buffers after the step are those replica 0's
    micro-batches left (the other replicas' are overwritten by its broadcast).
    """
    optimizer.zero_grad()
    losses, kept = [], None
    for share_inputs, share_targets in zip(inputs.chunk(replicas), targets.chunk(replicas)):
        for x, y in zip(share_inputs.chunk(microbatches), share_targets.chunk(microbatches)):
            loss = nn.functional.mse_loss(model(x), y) / (microbatches * replicas)
            loss.backward()
            losses.append(float(loss.detach()) * microbatches * replicas)
        if kept is None:
            kept = [buffer.clone() for buffer in model.buffers()]
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), kept):
                buffer.copy_(value)
    optimizer.step()
    return sum(losses) / len(losses)


def reference_run(layers, microbatches: int, replicas: int = 1) -> dict:
    """Return the reference's step losses, state after ``STEPS`` steps and evaluation loss and output."""
    model = nn.Sequential(*copy.deepcopy(layers))
    optimizer = sgd(model.parameters())
    losses = [reference_step(model, optimizer, *data(step), microbatches, replicas) for step in range(STEPS)]
    model.eval()
    with torch.no_grad():
        inputs, targets = data(99)
        output = model(inputs)
        evaluation = float(nn.functional.mse_loss(output, targets))
    state = {name: value.clone() for name, value in model.state_dict().items()}
    return {"losses": losses, "state": state, "eval": evaluation, "output": output}


def largest_error(found: dict, expected: dict) -> float:
    """Return the largest error over ``found``'s values relative to the larger of 0.01 and the value's magnitude
    (a bias the BatchNorm after it leaves without gradient stays at rounding noise); integers exactly: 0 or infinity.
    """
    errors = []
    for name, value in found.items():
        if value.is_floating_point():
            scale = max(float(expected[name].abs().max()), 0.01)
            errors.append(float((value - expected[name]).abs().max()) / scale)
        else:
            errors.append(0.0 if torch.equal(value, expected[name]) else float("inf"))
    return max(errors)


def state_of(pipe) -> dict:
    """Return this process's stages' full parameters and buffers (collective at ZeRO-3)."""
    return pipe.gathered_state_dict()


# ---------------------------------------------------------------- replicas
def train_replicas(zeros: tuple[int, ...], broadcast_buffers: bool) -> list[dict]:
    """Worker of 1 rank × 2 replicas: each process seeds its layers by its rank; train, evaluate, return states."""
    results = []
    for zero in zeros:
        layers = batchnorm_layers(seed=torch.distributed.get_rank() + 10 * zero)
        pipe = layerpipe.Pipeline(
            layers, nn.functional.mse_loss, "gpipe", microbatches=2, data_parallel=2, zero=zero, optimizer=sgd,
            broadcast_buffers=broadcast_buffers, timeout=60,
        )  # fmt: skip
        initial = state_of(pipe)
        pipe.eval_step(*data(98))  # agree the shapes in evaluation mode (see train_batchnorm)
        losses = [pipe.train_step(*data(step)) for step in range(STEPS)]
        evaluation = pipe.eval_step(*data(99))
        results.append({"initial": initial, "losses": losses, "state": state_of(pipe), "eval": evaluation})
    return results


@pytest.mark.multiprocess
def test_replicas_seeded_differently_end_equal_to_the_reference_from_replica_0_at_every_zero_level():
    zeros = (0, 1, 2, 3)
    per_process = layerpipe.launch(train_replicas, 2, (zeros, True), timeout=300)
    for index, zero in enumerate(zeros):
        start = batchnorm_layers(seed=10 * zero)  # replica 0 is process 0
        expected_initial = nn.Sequential(*start).state_dict()
        expected = reference_run(start, microbatches=2, replicas=2)
        for process, results in enumerate(per_process):
            found = results[index]
            where = f"zero={zero} process {process}"
            assert largest_error(found["initial"], expected_initial) == 0.0, f"{where}: starts from replica 0"
            for step, loss in enumerate(found["losses"]):
                assert abs(loss - expected["losses"][step]) <= TOLERANCE * abs(expected["losses"][step]), where
            assert largest_error(found["state"], expected["state"]) <= TOLERANCE, f"{where}: parameters and buffers"
            assert abs(found["eval"] - expected["eval"]) <= TOLERANCE * expected["eval"], f"{where}: evaluation"


@pytest.mark.multiprocess
def test_without_broadcast_buffers_each_replica_keeps_its_own_running_statistics():
    first, second = layerpipe.launch(train_replicas, 2, ((0,), False), timeout=300)
    assert largest_error(first[0]["initial"], second[0]["initial"]) == 0.0, "construction still starts them equal"
    assert not torch.equal(first[0]["state"]["1.running_mean"], second[0]["state"]["1.running_mean"])
    assert torch.equal(first[0]["state"]["0.weight"], second[0]["state"]["0.weight"]), "weights stay equal"


def test_layerpipe_train_takes_the_switch_off(tmp_path):
    on = config_from(build_parser().parse_args(["--output", str(tmp_path / "on")]))
    off = config_from(build_parser().parse_args(["--no-broadcast-buffers", "--output", str(tmp_path / "off")]))
    assert (on.broadcast_buffers, off.broadcast_buffers) == (True, False)


# ---------------------------------------------------------------- BatchNorm, modes, dropout
def train_batchnorm(microbatches: int, agree_in_evaluation: bool) -> dict:
    """Worker of 2 pipeline ranks: train a BatchNorm model ``STEPS`` steps, evaluate; return losses and state.

    ``agree_in_evaluation``: run an ``eval_step`` on a batch of the training shapes first, so that the shape
    agreement (which runs micro-batch 0 once more) happens in evaluation mode and touches no buffer.
    """
    layers = batchnorm_layers(seed=0)
    pipe = layerpipe.Pipeline(
        layers, nn.functional.mse_loss, "gpipe", microbatches=microbatches, partition=[0, 3], optimizer=sgd, timeout=60
    )
    before = state_of(pipe)
    if agree_in_evaluation:
        pipe.eval_step(*data(98))
    unchanged = largest_error(state_of(pipe), before) == 0.0
    losses = [pipe.train_step(*data(step)) for step in range(STEPS)]
    state = state_of(pipe)
    evaluation = pipe.eval_step(*data(99))
    output = pipe.forward(data(99)[0])
    return {"losses": losses, "state": state, "eval": evaluation, "output": output, "unchanged": unchanged}


def check_batchnorm(microbatches: int, per_process: list[dict]) -> None:
    """Assert both ranks match one process's gradient accumulation: losses, parameters, buffers, evaluation."""
    expected = reference_run(batchnorm_layers(seed=0), microbatches)
    for rank, found in enumerate(per_process):
        assert found["unchanged"], f"rank {rank}: evaluation changed the state"
        for step, loss in enumerate(found["losses"]):
            assert abs(loss - expected["losses"][step]) <= TOLERANCE * abs(expected["losses"][step])
        assert largest_error(found["state"], expected["state"]) <= TOLERANCE, f"rank {rank}: parameters and buffers"
        assert abs(found["eval"] - expected["eval"]) <= TOLERANCE * expected["eval"], f"rank {rank}: evaluation"
    assert per_process[0]["output"] is None
    assert relative_error(per_process[1]["output"], expected["output"]) <= TOLERANCE


@pytest.mark.multiprocess
@pytest.mark.parametrize("microbatches", [1, 4])
def test_batchnorm_trains_and_evaluates_as_one_process_once_shapes_are_agreed(microbatches):
    per_process = layerpipe.launch(train_batchnorm, 2, (microbatches, True), timeout=300)
    check_batchnorm(microbatches, per_process)


@pytest.mark.multiprocess
def test_batchnorm_trains_and_evaluates_as_one_process_from_the_first_step():
    per_process = layerpipe.launch(train_batchnorm, 2, (2, False), timeout=300)
    check_batchnorm(2, per_process)


def modes_and_dropout() -> dict:
    """Worker of 2 pipeline ranks with dropout: what evaluation changes, which modes run, and the warning."""
    layers = batchnorm_layers(seed=0, dropout=0.5)
    pipe = layerpipe.Pipeline(layers, nn.functional.mse_loss, "gpipe", microbatches=2, partition=[0, 3], timeout=60)
    layers[4].eval()  # a module the user put in evaluation mode keeps it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.train_step(*data(0))
        pipe.train_step(*data(1))
    trained = state_of(pipe)
    first, second = pipe.eval_step(*data(99)), pipe.eval_step(*data(99))
    outputs = pipe.forward(data(99)[0]), pipe.forward(data(99)[0])
    modes = [module.training for stage in pipe.stages.values() for module in stage.modules()]
    unchanged = largest_error(state_of(pipe), trained) == 0.0
    pipe.eval()
    pipe.train_step(*data(2))  # in evaluation mode: running statistics are used, not updated
    evaluated = largest_error(state_of(pipe), trained) == 0.0
    return {
        "equal": first == second,
        "outputs": outputs,
        "unchanged": unchanged,
        "modes": modes,
        "user_mode": layers[4].training if pipe.rank == 1 else None,
        "warnings": [str(warning.message) for warning in caught],
        "eval_mode_step_keeps_buffers": evaluated,
        "training": pipe.training,
    }


@pytest.mark.multiprocess
def test_evaluation_runs_in_evaluation_mode_changes_nothing_and_gives_the_modes_back():
    per_process = layerpipe.launch(modes_and_dropout, 2, (), timeout=300)
    for rank, found in enumerate(per_process):
        assert found["equal"], f"rank {rank}: two identical eval_step calls differ"
        assert found["unchanged"], f"rank {rank}: evaluation changed a buffer"
        assert found["eval_mode_step_keeps_buffers"], f"rank {rank}: train_step after eval() updated a buffer"
        assert found["warnings"] == [NO_OPTIMIZER], f"rank {rank}: warns once without an optimizer"
        assert found["training"] is False
    second = per_process[1]
    assert torch.equal(*second["outputs"]), "two identical forward calls differ"
    user_set = [module for module in second["modes"] if not module]
    assert len(user_set) == 1, "after evaluation every module has its mode back (one was set to eval by the user)"
    assert second["user_mode"] is False
