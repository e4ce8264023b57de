"""The model behaves in the pipeline as in one process: the shape agreement leaves no trace, in-place layers at a
stage's start train, layer outputs are checked, and evaluation takes any batch size.

Float64 against one process.  Each launch runs several checks, so processes start few times.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from runtime_models import Chain, batch, mlp_layers, reference_run, relative_error
from torch import nn

import layerpipe

TOLERANCE = 1e-10


def _norm_layers(seed: int = 0) -> list[nn.Module]:
    """Return layers with BatchNorm and Dropout (the agreement must change neither buffers nor random state)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)]
    return [layer.double() for layer in layers]


class NeedsValues(nn.Module):
    """Scales by a Python number read from its input: it cannot run on meta tensors."""

    def forward(self, x):
        return x * (1.0 + 0.0 * float(x.sum()))


def _buffers(pipe) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for stage in pipe.stages.values() for name, buffer in stage.named_buffers()}


def _agreement_leaves_no_trace(layers: list[nn.Module]) -> tuple[bool, bool, list[str]]:
    """Worker: agree the shapes of a new input shape; return whether the random state and the buffers stayed."""
    pipe = layerpipe.Pipeline(layers, nn.functional.mse_loss, microbatches=2, timeout=60)
    inputs, _ = batch(4)
    buffers, random_state = _buffers(pipe), torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.shapes.metas_for((inputs[:2],))
    same_buffers = all(torch.equal(buffers[name], found) for name, found in _buffers(pipe).items())
    return torch.equal(random_state, torch.get_rng_state()), same_buffers, [str(w.message) for w in caught]


def test_the_agreement_changes_no_random_state_and_no_buffer_on_two_ranks():
    for same_random_state, same_buffers, warned in layerpipe.launch(
        _agreement_leaves_no_trace, 2, (_norm_layers(),), timeout=60
    ):
        assert same_random_state and same_buffers and warned == []


def test_a_layer_that_cannot_run_on_meta_falls_back_to_a_forward_that_restores_buffers_and_random_state():
    layers = _norm_layers()
    layers.insert(2, NeedsValues())
    results = layerpipe.launch(_agreement_leaves_no_trace, 2, (layers,), timeout=60)
    for same_random_state, same_buffers, _ in results:
        assert same_random_state and same_buffers
    warned = [line for _, _, lines in results for line in lines]
    assert len(warned) == 1 and "cannot run on meta tensors to agree the boundary shapes" in warned[0]
    assert "DataDependentOutputException" in warned[0] and "were undone" in warned[0]


def _trains_batch_norm(steps: int, microbatches: int) -> dict[str, torch.Tensor]:
    """Worker: train the BatchNorm model (no dropout) for ``steps`` SGD steps; return this rank's buffers."""
    layers = [layer for layer in _norm_layers() if not isinstance(layer, nn.Dropout)]
    pipe = layerpipe.Pipeline(
        layers,
        nn.functional.mse_loss,
        microbatches=microbatches,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        timeout=60,
    )
    for step in range(steps):
        pipe.train_step(*batch(8, seed=step + 1))
    return pipe.gathered_state_dict()


def test_batch_norm_buffers_after_training_equal_one_process_doing_the_same_gradient_accumulation():
    steps, microbatches = 3, 2
    found = {}
    for state in layerpipe.launch(_trains_batch_norm, 2, (steps, microbatches), timeout=60):
        found.update(state)
    model = Chain(*copy.deepcopy([layer for layer in _norm_layers() if not isinstance(layer, nn.Dropout)]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        inputs, targets = batch(8, seed=step + 1)
        optimizer.zero_grad()
        for part, target in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
            (nn.functional.mse_loss(model(part), target) / microbatches).backward()
        optimizer.step()
    for name, expected in model.state_dict().items():
        if expected.is_floating_point():
            assert torch.allclose(found[name], expected, rtol=TOLERANCE, atol=1e-14), name
        else:
            assert torch.equal(found[name], expected), name
    assert int(found["1.num_batches_tracked"]) == steps * microbatches


@pytest.mark.parametrize("precision", ["bf16"])
def test_fake_agreement_gives_the_dtypes_of_autocast(precision):
    """Single process, no launch: the fake forward runs under the run's precision as a real one does."""
    from layerpipe.runtime.meta_forward import fake_forward, fake_inputs, fake_mode
    from layerpipe.runtime.precision import compute
    from layerpipe.runtime.stage import Stage, metas_of

    stage = Stage(0, 0, [nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)])
    inputs = (torch.randn(5, 6),)
    mode = fake_mode()
    found = metas_of(
        fake_forward(mode, stage, fake_inputs(mode, inputs, torch.device("cpu")), precision, torch.device("cpu"))
    )
    with torch.no_grad(), compute(precision, torch.device("cpu")):
        expected = metas_of(stage(*inputs))
    assert found == expected and found[0].dtype == torch.bfloat16


def _in_place_layers(seed: int = 0) -> list[nn.Module]:
    """Return layers whose second stage (cut at layer 3) starts with an in-place ReLU, then an in-place add."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Linear(5, 3)]
    return [layer.double() for layer in layers]


def _trains_in_place(schedule: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Worker: train the in-place model for three AdamW steps; return the losses and this rank's parameters."""
    pipe = layerpipe.Pipeline(
        _in_place_layers(),
        nn.functional.mse_loss,
        schedule=schedule,
        microbatches=2,
        stages_per_rank=1,
        partition=[0, 3],
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.05),
        timeout=60,
    )
    losses = [pipe.train_step(*batch(4, seed=step + 1)) for step in range(3)]
    return losses, {name: p.detach().clone() for name, p in pipe.named_parameters()}


@pytest.mark.parametrize("schedule", ["breadth-first", "zero-bubble"])
def test_an_in_place_relu_at_a_stage_start_trains_equal_to_one_process(schedule):
    expected_losses, _, expected_parameters = reference_run(_in_place_layers(), 3, 4)
    found = {}
    for losses, parameters in layerpipe.launch(_trains_in_place, 2, (schedule,), timeout=60):
        assert all(abs(a - b) <= TOLERANCE * abs(b) for a, b in zip(losses, expected_losses))
        found.update(parameters)
    assert sorted(found) == sorted(expected_parameters)
    for name, expected in expected_parameters.items():
        assert relative_error(found[name], expected) <= TOLERANCE, name


class Twice(nn.Module):
    """Doubles its input, in place or not: unlike ReLU, doing it twice to one tensor shows."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.mul_(2) if self.inplace else x * 2


def _trains_async_in_place() -> list[tuple[list[float], dict[str, torch.Tensor]]]:
    """Worker: train the in-place model and its copy without in-place layers under the async schedule.

    For each weight policy and first layer of stage 1 (ReLU, Twice), in place and not: the losses of four calls
    and this rank's parameters after the stream is drained.  ``stashed`` keeps the forward's graph; ``live`` runs
    the forward again in the backward, from the stored input, which the first forward must leave as it was.
    """
    results = []
    for policy in ("stashed", "live"):
        for first in (nn.ReLU, Twice):
            for in_place in (True, False):
                layers = _in_place_layers()
                layers[3] = first(inplace=in_place)
                pipe = layerpipe.Pipeline(
                    layers,
                    nn.functional.mse_loss,
                    schedule="async",
                    microbatches=2,
                    weight_policy=policy,
                    partition=[0, 3],
                    optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
                    timeout=60,
                )
                losses = [pipe.train_step(*batch(4, seed=step + 1)) for step in range(4)]
                results.append((losses, pipe.gathered_state_dict()))  # the state drains the stream
    return results


def test_in_place_layers_at_a_stage_start_train_under_async_as_their_plain_forms_bit_for_bit():
    for per_run in layerpipe.launch(_trains_async_in_place, 2, timeout=60):
        for case in range(0, len(per_run), 2):
            (in_place_losses, in_place), (losses, plain) = per_run[case : case + 2]
            assert in_place_losses == losses, case
            assert sorted(in_place) == sorted(plain) and all(torch.equal(in_place[n], plain[n]) for n in plain), case


class Boom(nn.Module):
    """Raises on rank 1 in the training step (after the shapes were agreed)."""

    def forward(self, x):
        if torch.distributed.get_rank() == 1 and torch.is_grad_enabled():
            raise ValueError("boom\nsecond line")
        return x


def _train_with_boom():
    layers = [nn.Linear(6, 6).double(), Boom(), nn.Linear(6, 3).double()]
    pipe = layerpipe.Pipeline(layers, nn.functional.mse_loss, "gpipe", microbatches=2, partition=[0, 1], timeout=30)
    return pipe.train_step(*batch(4))


def test_a_launch_error_leads_with_the_failing_rank_action_layer_and_original_exception():
    with pytest.raises(layerpipe.LaunchError) as caught:
        layerpipe.launch(_train_with_boom, 2, timeout=30)
    lines = str(caught.value).splitlines()
    assert lines[0] == "rank 1 failed: at 1F0, in layer 1 (Boom) of stage 1: ValueError: boom"
    assert lines[1].startswith("rank 0: "), "the other rank's consequence comes second, in one line"
    assert lines[2] == "rank 1's report:" and lines[3].startswith("Traceback")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.second(self.first(x))


def _pipeline_of_a_model_object():
    layerpipe.Pipeline(Net(), nn.functional.mse_loss, timeout=30)


def test_a_model_object_is_refused_saying_how_to_give_layers():
    with pytest.raises(layerpipe.LaunchError) as caught:
        layerpipe.launch(_pipeline_of_a_model_object, 1, timeout=30)
    assert str(caught.value).splitlines()[0] == (
        "rank 0 failed: TypeError: layers: a Net, not a list of layers; give the model as a list of nn.Module "
        "(or an nn.Sequential) whose layers each take the previous one's output, e.g. list(model.children()) "
        "when its forward calls them in order (see docs/one-process.md)"
    )


def test_a_pipeline_outside_launched_processes_says_to_use_launch_or_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    if torch.distributed.is_initialized():
        pytest.skip("this process already has a process group")
    with pytest.raises(RuntimeError) as caught:
        layerpipe.Pipeline([nn.Linear(6, 3)], nn.functional.mse_loss)
    assert (
        str(caught.value)
        .splitlines()[0]
        .startswith(
            "layerpipe runs one process per pipeline rank, started together, and this process was not: call your "
            "function with layerpipe.launch(fn, nprocs), or start the script with torchrun"
        )
    )


class ReturnsDict(nn.Module):
    def forward(self, x):
        return {"hidden": x}


class ReturnsTupleWithNone(nn.Module):
    def forward(self, x):
        return x, None


def _pipeline_with(layer: nn.Module):
    layers = [nn.Linear(6, 6).double(), layer, nn.Linear(6, 3).double()]
    pipe = layerpipe.Pipeline(layers, nn.functional.mse_loss, "gpipe", microbatches=2, timeout=30)
    return pipe.train_step(*batch(4))


@pytest.mark.parametrize(
    "layer, found",
    [
        (
            ReturnsDict(),
            "a dict: a layer must return a tensor or a tuple of tensors; return its values as a tuple, in the "
            "order the next layer takes them as arguments",
        ),
        (ReturnsTupleWithNone(), "a tuple holding None: a layer must return a tensor or a tuple of tensors"),
    ],
)
def test_a_layer_returning_other_than_tensors_is_refused_in_one_line_naming_it(layer, found):
    with pytest.raises(layerpipe.LaunchError) as caught:
        layerpipe.launch(_pipeline_with, 1, (layer,), timeout=30)
    first = str(caught.value).splitlines()[0]
    assert first == f"rank 0 failed: PipelineError: layer 1 ({type(layer).__name__}) of stage 0 returned {found}"


def _evaluates_any_batch_size(samples: tuple[int, ...]) -> list:
    """Worker: eval_step and forward on batches of ``samples`` with 4 micro-batches; return the losses and outputs."""
    pipe = layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, microbatches=4, timeout=60)
    found = []
    for size in samples:
        inputs, targets = batch(size, seed=size)
        found.append((pipe.eval_step(inputs, targets), pipe.forward(inputs)))
    return found


def test_eval_step_and_forward_on_359_samples_with_4_microbatches_equal_one_process():
    sizes = (359, 360, 5, 359)
    model, outputs = Chain(*mlp_layers()), 0
    for rank, found in enumerate(layerpipe.launch(_evaluates_any_batch_size, 2, (sizes,), timeout=60)):
        for size, (loss, output) in zip(sizes, found):
            inputs, targets = batch(size, seed=size)
            with torch.no_grad():
                expected = model(inputs)
            assert abs(loss - float(nn.functional.mse_loss(expected, targets))) <= TOLERANCE * loss, (rank, size)
            if output is not None:
                assert relative_error(output, expected) <= TOLERANCE, (rank, size)
                outputs += 1
    assert outputs == len(sizes), "the last stage's rank returns the whole batch's output"


def test_an_uneven_split_keeps_all_micro_batches_but_the_last_equal():
    from layerpipe.runtime.batches import microbatch_sizes

    assert microbatch_sizes(359, 4) == [90, 90, 90, 89]
    assert microbatch_sizes(5, 4) == [1, 1, 1, 2]
    assert microbatch_sizes(8, 4) == [2, 2, 2, 2]


def _trains_with_dropout(steps: int, microbatches: int) -> list[float]:
    """Worker (one process): train the BatchNorm and Dropout model, seeded just before the first step."""
    pipe = layerpipe.Pipeline(
        _norm_layers(),
        nn.functional.mse_loss,
        "gpipe",
        microbatches=microbatches,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        timeout=60,
    )
    torch.manual_seed(7)
    return [pipe.train_step(*batch(8, seed=step + 1)) for step in range(steps)]


def test_dropout_draws_the_same_masks_as_one_process_since_the_agreement_draws_none():
    steps, microbatches = 3, 2
    (found,) = layerpipe.launch(_trains_with_dropout, 1, (steps, microbatches), timeout=60)
    model = Chain(*copy.deepcopy(_norm_layers()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(7)
    for step in range(steps):
        inputs, targets = batch(8, seed=step + 1)
        optimizer.zero_grad()
        loss = 0.0
        for part, target in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
            micro = nn.functional.mse_loss(model(part), target) / microbatches
            micro.backward()
            loss += float(micro.detach())
        optimizer.step()
        assert abs(found[step] - loss) <= TOLERANCE * abs(loss), step


def _evaluates_uneven_on_two_replicas_at_zero_3():
    """Worker: one SGD step on 2 replicas at ZeRO-3, then eval_step on 358 samples and on 359 (refused)."""
    pipe = layerpipe.Pipeline(
        mlp_layers(),
        nn.functional.mse_loss,
        microbatches=4,
        data_parallel=2,
        zero=3,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        timeout=60,
    )
    pipe.train_step(*batch(8))
    state = pipe.gathered_state_dict()
    loss = pipe.eval_step(*batch(358, seed=3))
    with pytest.raises(ValueError) as caught:
        pipe.eval_step(*batch(359, seed=3))
    return loss, state, str(caught.value)


def test_uneven_evaluation_on_replicas_splits_each_share_and_equals_one_process():
    for loss, state, refused in layerpipe.launch(_evaluates_uneven_on_two_replicas_at_zero_3, 2, timeout=60):
        model = Chain(*mlp_layers())
        model.load_state_dict(state)
        inputs, targets = batch(358, seed=3)
        with torch.no_grad():
            expected = float(nn.functional.mse_loss(model(inputs), targets))
        assert abs(loss - expected) <= TOLERANCE * expected
        assert refused == (
            "inputs batch of 359 samples: must split into data_parallel=2 equal shares "
            "(a multiple of 2 along the first dimension)"
        )
