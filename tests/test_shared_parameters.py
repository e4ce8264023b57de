"""Parameters shared by several layers inside one stage train as in one process (across stages: ``test_tied_parameters``).

Inside one stage a shared parameter is one slot of the stage's flat buffers,
given to the optimizer once, and every layer holding it sees that storage:
losses, gradients and parameters after three AdamW steps equal a
single-process float64 reference on 2 pipeline ranks and on 1×2 and 2×2 data
parallelism at every ZeRO level.  State dicts list every name of a shared
parameter as ``nn.Sequential(*layers).state_dict()`` does, and a checkpoint
loads back into the tie.
"""

from __future__ import annotations

import re

import pytest
import torch
from runtime_models import Chain, batch, reference_loss, reference_run, relative_error
from torch import nn

import layerpipe
from layerpipe.emulation import PipelinedBackprop
from layerpipe.runtime.checkpoint import load_checkpoint, load_weights, save_checkpoint
from layerpipe.runtime.partition import partition
from layerpipe.runtime.stage import Stage
from layerpipe.runtime.state import check_shared_values

STEPS = 3
TOLERANCE = 1e-10
PARTITION = [0, 3]  # stage 0: layers 0–2 (0 and 2 are one nn.Linear); stage 1: layers 3–6 (3 and 5 share a weight)


class TransposedUse(nn.Module):
    """Multiplies by the transpose of a weight it shares with another layer (not its own), plus a bias of its own."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(weight.shape[1], dtype=weight.dtype))

    def forward(self, x):
        return torch.tanh(x @ self.weight + self.bias)


def tied_layers(seed: int = 0) -> list[nn.Module]:
    """Return seven float64 layers: 0 and 2 are the same ``nn.Linear``; 5 uses layer 3's weight (transposed)."""
    torch.manual_seed(seed)
    square, narrow = nn.Linear(6, 6).double(), nn.Linear(6, 4).double()
    return [square, nn.Tanh(), square, narrow, nn.Tanh(), TransposedUse(narrow.weight), nn.Linear(6, 3).double()]


def adamw(parameters):
    return torch.optim.AdamW(parameters, lr=0.05)


def pipeline(data: int, zero: int, layers=None, partition=PARTITION) -> layerpipe.Pipeline:
    return layerpipe.Pipeline(
        layers if layers is not None else tied_layers(),
        nn.functional.mse_loss,
        schedule="breadth-first",
        microbatches=2,
        stages_per_rank=1,
        data_parallel=data,
        zero=zero,
        partition=partition,
        optimizer=adamw,
        timeout=20,
    )


def train_and_compare(pipeline_ranks: int, data: int, zeros: tuple[int, ...]) -> list[tuple]:
    """Worker: per ZeRO level, train ``STEPS`` steps; return the largest errors against the reference and the names."""
    results = []
    samples = 4 * data
    expected_losses, expected_grads, expected_params = reference_run(tied_layers(), STEPS, samples)
    expected_state = state_of(expected_params)
    for zero in zeros:
        pipe = pipeline(data, zero, partition=PARTITION if pipeline_ranks > 1 else [0])
        loss_error = grad_error = 0.0
        for step in range(STEPS):
            loss = pipe.train_step(*batch(samples, seed=step + 1))
            loss_error = max(loss_error, abs(loss - expected_losses[step]) / abs(expected_losses[step]))
            for shard in pipe.shards.values():
                ranges = {name: (start, end) for name, start, end in shard.shard_ranges()}
                for name, gradient in shard.local_gradients():
                    expected = expected_grads[step][name]
                    if shard.zero >= 2:
                        expected = expected.reshape(-1)[slice(*ranges[name])]
                    if expected.numel():
                        grad_error = max(grad_error, relative_error(gradient.reshape(expected.shape), expected))
        state = pipe.gathered_state_dict()
        param_error = max(relative_error(value, expected_state[name]) for name, value in state.items())
        names = [name for name, _ in pipe.named_parameters()]
        results.append((zero, loss_error, grad_error, param_error, sorted(state), names))
    return results


def state_of(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``nn.Sequential(*tied_layers()).state_dict()`` holding ``parameters`` (given once, by first name)."""
    model = nn.Sequential(*tied_layers())
    model.load_state_dict(parameters, strict=False)
    return model.state_dict()


def reference_names() -> tuple[list[str], list[str]]:
    """Return the names of ``nn.Sequential(*tied_layers())``: its state dict's (every name) and its parameters' (once)."""
    model = nn.Sequential(*tied_layers())
    return sorted(model.state_dict()), sorted(name for name, _ in model.named_parameters())


@pytest.mark.multiprocess
@pytest.mark.parametrize(("pipeline_ranks", "data", "zeros"), [(2, 1, (0,)), (1, 2, (0, 3)), (2, 2, (0, 1, 2, 3))])
def test_a_parameter_shared_inside_a_stage_trains_as_in_one_process(pipeline_ranks, data, zeros):
    per_process = layerpipe.launch(train_and_compare, pipeline_ranks * data, (pipeline_ranks, data, zeros), timeout=300)
    state_names, parameter_names = reference_names()
    for index, zero in enumerate(zeros):
        rows = [results[index] for results in per_process]
        for process, (_, loss_error, grad_error, param_error, _, _) in enumerate(rows):
            case = f"{pipeline_ranks}x{data} zero={zero} process {process}"
            assert loss_error <= TOLERANCE, f"{case}: loss error {loss_error:.2e}"
            assert grad_error <= TOLERANCE, f"{case}: gradient error {grad_error:.2e}"
            assert param_error <= TOLERANCE, f"{case}: parameter error {param_error:.2e}"
        for replica in range(data):
            held = [rows[rank * data + replica] for rank in range(pipeline_ranks)]
            assert sorted(name for row in held for name in row[4]) == state_names
            assert sorted(name for row in held for name in row[5]) == parameter_names


def train_save(folder: str) -> dict:
    """Worker: train one step at ZeRO-3 on 1×2, save a checkpoint; return the weights."""
    pipe = pipeline(2, 3, partition=[0])
    pipe.train_step(*batch(8, seed=1))
    save_checkpoint(pipe, folder, {"step": 1})
    return pipe.gathered_state_dict()


def load_train(folder: str) -> tuple[list[float], dict, bool]:
    """Worker: load the checkpoint into 2 pipeline ranks, train two steps; return losses, weights and whether the
    layers still hold one parameter."""
    layers = tied_layers(seed=5)  # other initial values: only the checkpoint's may count
    pipe = pipeline(1, 0, layers=layers)
    load_checkpoint(pipe, folder)
    losses = [pipe.train_step(*batch(8, seed=step + 2)) for step in range(2)]
    return losses, pipe.gathered_state_dict(), layers[0].weight is layers[2].weight


@pytest.mark.multiprocess
def test_a_checkpoint_of_a_shared_parameter_loads_into_another_layout_and_keeps_the_tie(tmp_path):
    folder = str(tmp_path / "checkpoint")
    saved = layerpipe.launch(train_save, 2, (folder,), timeout=120)[0]
    state_names, _ = reference_names()
    assert sorted(saved) == state_names
    assert torch.equal(saved["0.weight"], saved["2.weight"]) and torch.equal(saved["3.weight"], saved["5.weight"])
    weights = load_weights(folder)
    model = nn.Sequential(*tied_layers(seed=7))
    model.load_state_dict(weights)  # strict: every name nn.Sequential lists is there
    assert model[0].weight is model[2].weight
    per_process = layerpipe.launch(load_train, 2, (folder,), timeout=120)
    expected_losses, _, expected_params = reference_run(tied_layers(), 3, batches=[batch(8, seed=s) for s in (1, 2, 3)])
    expected_state = state_of(expected_params)
    losses = per_process[1][0]
    for found, expected in zip(losses, expected_losses[1:]):
        assert abs(found - expected) <= TOLERANCE * abs(expected)
    found = {name: value for _, state, _ in per_process for name, value in state.items()}
    assert sorted(found) == state_names
    for name, value in found.items():
        assert relative_error(value, expected_state[name]) <= TOLERANCE, name
    assert all(tied for _, _, tied in per_process)


def test_a_state_giving_one_shared_parameter_two_values_is_refused():
    layers = tied_layers()
    state = nn.Sequential(*layers).state_dict()
    state["2.weight"] = state["2.weight"] + 1
    with pytest.raises(
        ValueError, match=re.escape("gives 0.weight and 2.weight, one parameter shared by layers of stage 0, different")
    ):
        check_shared_values(Stage(0, 0, layers[:3]), state)


def train_async(calls: int) -> tuple[list[float], dict, float, bool]:
    """Worker: train ``calls`` calls of the async stream (stashed weights), flush; return the losses, the weights,
    an evaluation loss and whether layers 0 and 2 still hold the parameter the optimizer updates."""
    layers = tied_layers()
    pipe = layerpipe.Pipeline(
        layers,
        nn.functional.mse_loss,
        schedule="async",
        microbatches=2,
        partition=PARTITION,
        optimizer=sgd,
        timeout=60,
    )
    held = layers[0].weight
    losses = [pipe.train_step(*batch(4, seed=call + 1)) for call in range(calls)]
    state = pipe.gathered_state_dict()  # flushes
    evaluated = pipe.eval_step(*batch(4, seed=99))
    return losses, state, evaluated, layers[0].weight is held and layers[2].weight is held


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


@pytest.mark.multiprocess
def test_the_async_stream_trains_a_layer_used_twice_in_a_stage_as_the_emulator_and_leaves_it_its_weights():
    calls = 3
    per_process = layerpipe.launch(train_async, 2, (calls,), timeout=120)
    layers = tied_layers()
    stages = [Chain(*layers[first:end]) for first, end in zip(PARTITION, PARTITION[1:] + [len(layers)])]
    emulator = PipelinedBackprop(stages, nn.functional.mse_loss, sgd, 1, "stashed")
    inputs, targets = [], []
    for call in range(calls):
        call_inputs, call_targets = batch(4, seed=call + 1)
        inputs += list(call_inputs.chunk(2))
        targets += list(call_targets.chunk(2))
    emulator.train(inputs, targets)
    expected = state_of(dict(nn.Sequential(*layers).named_parameters()))
    found = {name: value for _, state, _, _ in per_process for name, value in state.items()}
    assert sorted(found) == sorted(expected)
    for name, value in found.items():
        assert relative_error(value, expected[name]) <= TOLERANCE, name
    assert all(kept for *_, kept in per_process), "a forward on stashed weights left them in the layer"
    evaluated = per_process[1][2]
    expected_eval = reference_loss(tied_layers(), found, *batch(4, seed=99))
    assert abs(evaluated - expected_eval) <= TOLERANCE * expected_eval


# ---------------------------------------------------------------- across stages
def test_a_parameter_shared_across_stages_passes_the_partition_as_a_tie():
    """Cut between its holders, a shared parameter is tied across the stages (``test_tied_parameters`` trains it)."""
    assert partition(tied_layers(), 2, [0, 2]) == ((0, 2), (2, 7))
