"""A pipeline whose stages run on spatial chunks equals the single-process model, in float64 (4 gloo processes)."""

from __future__ import annotations

import pytest
import torch
from runtime_models import Chain, reference_run, relative_error
from torch import nn

import layerpipe
from layerpipe.knobs import ConfigError
from layerpipe.ops.spatial import SpatialConv2d, SpatialConvTranspose2d, SpatialGroupNorm


def spatial_layers(seed: int = 0) -> list[nn.Module]:
    """Convolutions down and up, a group norm, activations: every layer chunk-safe."""
    torch.manual_seed(seed)
    return [
        nn.Sequential(SpatialConv2d(3, 8, 3, padding=1), nn.GELU()).double(),
        nn.Sequential(SpatialConv2d(8, 8, 3, stride=2, padding=1), SpatialGroupNorm(2, 8), nn.ReLU()).double(),
        nn.Sequential(SpatialConv2d(8, 8, 5, padding=2, padding_mode="circular"), nn.Tanh()).double(),
        SpatialConvTranspose2d(8, 3, 4, stride=2, padding=1).double(),
    ]


def plain_layers() -> list[nn.Module]:
    """The same model with PyTorch's own layers and the same weights: the reference."""
    torch.manual_seed(0)
    plain = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, padding_mode="circular"), nn.Tanh()),
        nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1),
    ]
    for mine, theirs in zip(plain, spatial_layers()):
        mine.load_state_dict(theirs.state_dict())
    return [layer.double() for layer in plain]


def images(step: int):
    generator = torch.Generator().manual_seed(step)
    return (
        torch.randn(8, 3, 20, 12, dtype=torch.float64, generator=generator),
        torch.randn(8, 3, 20, 12, dtype=torch.float64, generator=generator),
    )


def reference(steps: int):
    """Return the single-process run's losses, last gradients and final parameters."""
    losses, grads, parameters = reference_run(
        plain_layers(), steps, lr=0.01, batches=[images(step) for step in range(steps)]
    )
    return losses, grads[-1], parameters


def _spatial_pipeline(options: dict):
    expected_losses, expected_grads, expected = reference(3)
    pipe = layerpipe.Pipeline(
        spatial_layers(),
        nn.functional.mse_loss,
        microbatches=2,
        spatial=2,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        timeout=60,
        **options,
    )
    losses = [pipe.train_step(*images(step)) for step in range(3)]
    whole = pipe.forward(images(9)[0])
    model = Chain(*plain_layers())
    model.load_state_dict(expected)
    output_error = 0.0 if whole is None else relative_error(whole, model(images(9)[0]))
    return (
        max(abs(found - wanted) / wanted for found, wanted in zip(losses, expected_losses)),
        max(relative_error(p.grad, expected_grads[name]) for name, p in pipe.named_parameters()),
        max(relative_error(p, expected[name]) for name, p in pipe.named_parameters()),
        output_error,
        pipe.layout.describe(),
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "options",
    [dict(schedule="breadth-first", stages_per_rank=2), dict(schedule="1f1b", data_parallel=2, zero=1)],
    ids=["2-pipeline-ranks x 2-chunks", "1 x 2-replicas x 2-chunks zero-1"],
)
def test_a_spatial_pipeline_equals_the_single_process_model(options):
    results = layerpipe.launch(_spatial_pipeline, 4, (options,))
    for rank, (loss, grad, parameter, output, _) in enumerate(results):
        assert loss <= 1e-10 and grad <= 1e-10 and parameter <= 1e-10 and output <= 1e-10, (
            f"rank {rank}: loss {loss:.1e}, gradients {grad:.1e}, parameters {parameter:.1e}, output {output:.1e}"
        )
    layout = results[-1][4]  # the last process's, as every process prints the same layout
    assert "2 spatial chunks = 4 processes" in layout, layout


def _refused(spatial, layers):
    try:
        layerpipe.Pipeline(layers, nn.functional.mse_loss, microbatches=2, spatial=spatial, timeout=30)
    except ConfigError as error:
        return str(error)
    return "accepted"


@pytest.mark.multiprocess
def test_a_spatial_split_the_model_or_the_processes_cannot_take_is_refused_in_one_line():
    assert layerpipe.launch(_refused, 2, (2, [nn.Linear(2, 2), nn.Linear(2, 2)]))[0].startswith(
        "spatial=2: the model has no spatial layers"
    )
    assert (
        layerpipe.launch(_refused, 2, (3, spatial_layers()))[0]
        == "spatial=3: must divide the 2 processes (pipeline ranks × data_parallel × spatial)"
    )
    assert layerpipe.launch(_refused, 2, (0, spatial_layers()))[0].startswith("spatial=0: must be a whole number")


def _superres_pipeline():
    """The super-resolution network on 2 pipeline ranks × 2 chunks against the same network in one process."""
    from layerpipe.models.config import SuperResConfig
    from layerpipe.models.superres import superres_layers

    config = SuperResConfig(channels=4, crop=16)
    generator = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.rand(4, 3, 8, 10, dtype=torch.float64, generator=generator),
            torch.rand(4, 3, 16, 20, dtype=torch.float64, generator=generator),
        )
        for _ in range(3)
    ]
    expected_losses, all_grads, expected = reference_run(
        [layer.double() for layer in superres_layers(config, seed=1)], 3, lr=0.01, batches=batches
    )
    grads = all_grads[-1]
    pipe = layerpipe.Pipeline(
        [layer.double() for layer in superres_layers(config, seed=1, spatial=True)],
        nn.functional.mse_loss,
        "breadth-first",
        microbatches=2,
        spatial=2,
        timeout=60,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
    )
    losses = [pipe.train_step(inputs, targets) for inputs, targets in batches]
    return (
        max(abs(found - wanted) / wanted for found, wanted in zip(losses, expected_losses)),
        max(relative_error(p.grad, grads[name]) for name, p in pipe.named_parameters() if name in grads),
        max(relative_error(p, expected[name]) for name, p in pipe.named_parameters()),
    )


@pytest.mark.multiprocess
def test_the_superres_network_on_a_spatial_pipeline_equals_the_single_process_network():
    for rank, (loss, grad, parameter) in enumerate(layerpipe.launch(_superres_pipeline, 4)):
        assert loss <= 1e-10 and grad <= 1e-10 and parameter <= 1e-10, (
            f"rank {rank}: loss {loss:.1e}, gradients {grad:.1e}, parameters {parameter:.1e}"
        )


def _two_heights_one_band_shape():
    """Heights 10 and 11 give band 0 five rows both times: the bands must still agree and weigh together."""
    torch.manual_seed(0)
    layers = [SpatialConv2d(1, 2, 3, padding=1).double(), nn.ReLU(), SpatialConv2d(2, 1, 3, padding=1).double()]
    whole = Chain(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1)).double()
    whole.load_state_dict(nn.Sequential(*layers).state_dict())
    pipe = layerpipe.Pipeline(layers, nn.functional.mse_loss, "gpipe", microbatches=2, spatial=2, timeout=60)
    errors = []
    for height in (10, 11):
        generator = torch.Generator().manual_seed(height)
        inputs, targets = (torch.randn(2, 1, height, 5, dtype=torch.float64, generator=generator) for _ in range(2))
        expected = float(nn.functional.mse_loss(whole(inputs), targets))
        errors.append(abs(pipe.eval_step(inputs, targets) - expected) / expected)
    try:
        pipe.eval_step(inputs, targets[:, 0, 0])
    except ValueError as error:
        return max(errors), str(error)
    return max(errors), "accepted"


@pytest.mark.multiprocess
def test_images_of_another_height_with_the_same_band_shape_are_agreed_again_and_targets_are_checked():
    for rank, (error, refusal) in enumerate(layerpipe.launch(_two_heights_one_band_shape, 2)):
        assert error <= 1e-12, (rank, error)
        assert (
            refusal == "targets: with spatial=2 every target must be images whose rows match the output's 11 "
            "(second-to-last dimension); a micro-batch's target has shape (1, 5)"
        ), refusal
