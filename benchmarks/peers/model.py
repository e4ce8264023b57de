"""Shared model, data and reference gradients for the peer benchmarks.

Every system starts from the same weights: `stack_layers` draws them from one
seeded generator in a fixed order, and systems that build their own modules
copy these weights in. The loss is `torch.nn.functional.mse_loss` (mean over
the whole global batch); workers that split the batch into micro-batches (or
data-parallel replicas) must average the per-micro-batch losses so that their
gradient equals the full-batch mean-loss gradient computed here.
"""

import torch


def stack_layers(width: int, blocks: int = 8, seed: int = 0) -> list:
    """Return [Linear(width, width), Tanh()] * blocks (float32), seeded in order."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return [layer.float() for layer in layers]


def make_batch(samples: int, width: int, seed: int = 1):
    """Return (inputs, targets), both float32 standard normal of shape (samples, width)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, width, generator=generator)
    targets = torch.randn(samples, width, generator=generator)
    return inputs, targets


def loss_fn(output, target):
    """The benchmark loss: mean squared error, mean over all elements."""
    return torch.nn.functional.mse_loss(output, target)


def reference_gradients(width: int, blocks: int, samples: int, seed: int = 0, batch_seed: int = 1) -> dict:
    """Return float64 full-batch gradients keyed "{layer_index}.weight" / "{layer_index}.bias"."""
    layers = [layer.double() for layer in stack_layers(width, blocks, seed)]
    inputs, targets = make_batch(samples, width, batch_seed)
    output = torch.nn.Sequential(*layers)(inputs.double())
    loss_fn(output, targets.double()).backward()
    return {
        f"{index}.{name}": param.grad.detach().clone()
        for index, layer in enumerate(layers)
        for name, param in layer.named_parameters()
    }


def parameter_keys(layers) -> dict:
    """Return {id(parameter): "{layer_index}.{name}"} for the modules of `stack_layers`."""
    return {
        id(param): f"{index}.{name}" for index, layer in enumerate(layers) for name, param in layer.named_parameters()
    }


def relative_errors(gradients: dict, reference: dict) -> dict:
    """Return {key: ||g - ref|| / ||ref||} for each key of `gradients` (computed in float64)."""
    return {
        key: float((grad.double() - reference[key]).norm() / reference[key].norm()) for key, grad in gradients.items()
    }
