"""Small float64 models and a single-process reference for the runtime tests."""

from __future__ import annotations

import copy

import torch
from torch import nn


def mlp_layers(seed: int = 0) -> list[nn.Module]:
    """Return ten layers of changing width, two of them without parameters."""
    torch.manual_seed(seed)
    widths = [6, 8, 5, 7, 4, 6, 5, 3]
    layers: list[nn.Module] = []
    for index, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if index in (1, 4):
            layers.append(nn.Tanh())
    return [layer.double() for layer in layers] + [nn.Linear(3, 3).double()]


class Split(nn.Module):
    """Returns three tensors of different shapes and dtypes: features, a per-row sum and an integer mask."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width + 2)

    def forward(self, x):
        h = torch.tanh(self.linear(x))
        return h, h.sum(-1, keepdim=True), (x[:, :1] > 0).long()


class Mix(nn.Module):
    """Takes the three tensors and returns three again, with the feature width changed."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.linear = nn.Linear(width, out)
        self.scale = nn.Linear(1, 1)

    def forward(self, h, total, mask):
        return torch.tanh(self.linear(h)) * (1 + mask), self.scale(total) + h.mean(-1, keepdim=True), mask


class Join(nn.Module):
    """Takes the three tensors and returns one."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width + 1, 3)

    def forward(self, h, total, mask):
        return self.linear(torch.cat([h, total], dim=-1)) + mask


def multi_tensor_layers(seed: int = 0) -> list[nn.Module]:
    """Return layers that pass three tensors (float, float, int64) between them, of changing shapes."""
    torch.manual_seed(seed)
    layers = [Split(6), Mix(8, 5), Mix(5, 7), Mix(7, 4), Mix(4, 4), Join(4)]
    return [layer.double() for layer in layers]


def batch(samples: int, width: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a float64 input batch and regression targets of width 3."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, width, dtype=torch.float64, generator=generator)
    targets = torch.randn(samples, 3, dtype=torch.float64, generator=generator)
    return inputs, targets


class Chain(nn.Sequential):
    """``nn.Sequential`` that passes a tuple returned by one layer as separate arguments to the next."""

    def forward(self, x):
        for layer in self:
            x = layer(*x) if isinstance(x, tuple) else layer(x)
        return x


def reference_run(layers, steps: int, samples: int = 0, lr: float = 0.05, batches=None):
    """Return per-step losses and gradients and the final parameters of a single-process AdamW run.

    Step ``s`` trains on ``batches[s]`` (inputs, targets) when given, else on
    ``batch(samples, seed=s + 1)``; parameters that take no gradient have none.
    """
    model = Chain(*copy.deepcopy(layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, grads = [], []
    for step in range(steps):
        inputs, targets = batches[step] if batches is not None else batch(samples, seed=step + 1)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    return losses, grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def reference_loss(layers, parameters: dict, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Return the single-process mean-squared-error loss of ``layers`` holding ``parameters`` (by ``nn.Sequential`` name)."""
    model = Chain(*copy.deepcopy(layers))
    model.load_state_dict(parameters, strict=False)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(inputs), targets))


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |found - expected| / max(max |expected|, 1e-30)."""
    found, expected = found.detach(), expected.detach()
    scale = max(float(expected.abs().max()), 1e-30)
    return float((found - expected).abs().max()) / scale


def wide_layers(stages: int = 4, width: int = 8, hidden: int = 64, seed: int = 0) -> list[nn.Module]:
    """Return ``stages`` groups of five layers whose saved activations (two ``hidden``-wide tanh outputs) dwarf their input.

    Cut with ``partition=[0, 5, 10, ...]``, each stage stores ``width + 2·hidden``
    numbers per sample for its backward, or only its ``width``-wide input when recomputed.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(stages):
        layers += [nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, width)]
    layers[-1] = nn.Linear(hidden, 3)
    return [layer.double() for layer in layers]
