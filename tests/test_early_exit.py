"""Early exit: a sequence of gated blocks leaves after its exit point, and the pipeline skips exactly the rest.

For every exit point ``k`` of four blocks split over two ranks: blocks up to
``k`` run once per micro-batch, blocks after it never, and the loss and
gradients equal those of running blocks ``0..k`` alone, in one process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerpipe
from layerpipe.models.early_exit import DropExitFlag, ExitGate, StartExitFlag

BLOCKS, WIDTH, MICROBATCHES = 4, 6, 4


class Counted(nn.Module):
    """A block that counts its forwards."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.linear(x))


def gated_layers(exit_after: int) -> list[nn.Module]:
    torch.manual_seed(0)
    blocks = [Counted().double() for _ in range(BLOCKS)]
    gates = [ExitGate(block, lambda output, index=index: index == exit_after) for index, block in enumerate(blocks)]
    return [StartExitFlag(), *gates, DropExitFlag()]


def data():
    generator = torch.Generator().manual_seed(3)
    return (
        torch.randn(8, WIDTH, dtype=torch.float64, generator=generator),
        torch.randn(8, WIDTH, dtype=torch.float64, generator=generator),
    )


def reference(exit_after: int):
    """Return the loss and the gradients of blocks 0..exit_after run alone."""
    torch.manual_seed(0)
    blocks = [Counted().double() for _ in range(BLOCKS)]
    inputs, targets = data()
    losses = []
    for x, y in zip(inputs.chunk(MICROBATCHES), targets.chunk(MICROBATCHES)):
        for block in blocks[: exit_after + 1]:
            x = block(x)
        losses.append(nn.functional.mse_loss(x, y))
    (sum(losses) / MICROBATCHES).backward()
    gradients = {
        f"{index + 1}.block.linear.{name}": torch.zeros_like(p) if p.grad is None else p.grad
        for index, block in enumerate(blocks)
        for name, p in block.linear.named_parameters()
    }
    return float(sum(losses).detach() / MICROBATCHES), gradients


def train_twice(exit_after: int):
    """Worker: two steps (the first also agrees shapes); return the loss, gradients and calls of the second."""
    layers = gated_layers(exit_after)
    pipe = layerpipe.Pipeline(
        layers, nn.functional.mse_loss, schedule="gpipe", microbatches=MICROBATCHES, partition=[0, 3], timeout=60
    )
    pipe.train_step(*data())
    for layer in layers[1:-1]:
        layer.block.calls = 0
    for parameter in pipe.parameters():
        parameter.grad.zero_()
    loss = pipe.train_step(*data())
    calls = {
        index: layer.block.calls
        for index, layer in enumerate(layers[1:-1])
        if any(layer is mine for stage in pipe.stages.values() for mine in stage.layers)
    }
    return loss, {name: p.grad.clone() for name, p in pipe.named_parameters()}, calls


@pytest.mark.multiprocess
def test_every_exit_point_skips_exactly_the_blocks_after_it():
    for exit_after in range(BLOCKS):
        expected_loss, expected_gradients = reference(exit_after)
        per_rank = layerpipe.launch(train_twice, 2, (exit_after,), timeout=60)
        calls = {index: count for _, _, found in per_rank for index, count in found.items()}
        assert calls == {index: MICROBATCHES if index <= exit_after else 0 for index in range(BLOCKS)}, exit_after
        for loss, gradients, _ in per_rank:
            assert loss == pytest.approx(expected_loss, rel=1e-12)
            for name, gradient in gradients.items():
                assert torch.allclose(gradient, expected_gradients[name], rtol=1e-10, atol=1e-14), (exit_after, name)
