"""Conditional early exit: leave a repeated block sequence once a test on its output passes.

``ExitGate(block, test)`` runs ``block`` unless the micro-batch has already
exited, then asks ``test(output)`` whether to exit after it.  The decision
travels with the activations as a boolean tensor beside them, so it
crosses stage boundaries like any other tensor the pipeline passes: every
rank's program stays the same (the messages still flow), and a stage whose
blocks come after the exit point runs no compute for that micro-batch — its
gates pass the input and the gradient straight through.  ``exit_flag``
starts the flag; ``DropExitFlag`` ends the sequence, returning the output alone.

No agreement between processes is needed: the rank that decides sends the
decision along with the data every later stage waits for anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class StartExitFlag(nn.Module):
    """Return ``(x, exited)`` with ``exited`` false: the first layer of an early-exit sequence."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros((), dtype=torch.bool, device=x.device)


class ExitGate(nn.Module):
    """Runs ``block`` unless the micro-batch has exited; exits after it when ``test(output)`` is true.

    ``test`` returns a Python bool or a one-element tensor for the whole micro-batch.
    """

    def __init__(self, block: nn.Module, test: Callable[[torch.Tensor], object]):
        super().__init__()
        self.block = block
        self.test = test

    def forward(self, x: torch.Tensor, exited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool(exited):
            return x, exited
        output = self.block(x)
        return output, torch.as_tensor(bool(self.test(output)), device=x.device)


class DropExitFlag(nn.Module):
    """Return the output alone: the last layer of an early-exit sequence."""

    def forward(self, x: torch.Tensor, exited: torch.Tensor) -> torch.Tensor:
        return x
