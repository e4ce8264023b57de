"""A stage's received activations, as tensors its layers may modify in place.

A stage's floating inputs are leaves that require a gradient, so that the
backward leaves in their ``.grad`` what to send to the previous stage.  In
one process the same tensors are outputs of the previous layer, and a
first layer such as ``nn.ReLU(inplace=True)`` may modify them; PyTorch
refuses that on a leaf (or a view of one).  ``entered`` hands the layers an
alias of each leaf made by an identity ``autograd.Function``: it shares the
leaf's storage (no copy), is neither a leaf nor a view, and its backward
passes the gradient on to the leaf, whose ``.grad`` is then what it would
be without the alias.

The ``async`` schedule's ``live`` weights are the one place a copy is
needed: their forward runs without a graph and the backward runs it again
from the stored input, so the first forward gets ``copied`` inputs and
leaves the stored ones as they were.
"""

from __future__ import annotations

import torch


class _Entry(torch.autograd.Function):
    """Identity whose output aliases its input's storage but is a new, non-view node of the graph."""

    @staticmethod
    def forward(ctx, leaf: torch.Tensor) -> torch.Tensor:
        return leaf.detach()

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        return gradient


def entered(arguments: tuple) -> tuple:
    """Return ``arguments`` with every tensor that requires a gradient replaced by an alias layers may modify."""
    return tuple(_Entry.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in arguments)


def copied(arguments: tuple) -> tuple:
    """Return ``arguments`` with every tensor replaced by a copy layers may modify (the originals kept as they are)."""
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in arguments)
