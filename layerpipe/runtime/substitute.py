"""A module run on substitute tensors in place of its parameters and buffers, with the originals put back after.

What ``torch.func.functional_call`` does, except for a module reached at two
places (one layer used twice in a stage): that call records each original
by its path, so the second path records the first's substitute and the
module keeps the substitutes afterwards — its later forwards run on them
(fake tensors after the shape agreement, a stale weight version after an
asynchronous forward).  Here every module is visited once, a tensor is
replaced wherever the module holds it (a parameter shared by two layers is
substituted in both), and the originals go back even when the call raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def substituted(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block the parameters and buffers named in ``tensors`` (by their first name, as
    ``named_parameters`` and ``named_buffers`` give them) are those tensors, wherever ``module`` holds them."""
    held = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    replacements = {id(held[name]): tensor for name, tensor in tensors.items()}
    slots = [
        (store, name, tensor)
        for inner in module.modules()
        for store in (inner._parameters, inner._buffers)
        for name, tensor in store.items()
        if tensor is not None and id(tensor) in replacements
    ]
    try:
        for store, name, tensor in slots:
            store[name] = replacements[id(tensor)]
        yield
    finally:
        for store, name, tensor in slots:
            store[name] = tensor


def call_with(module: nn.Module, tensors: Mapping[str, torch.Tensor], arguments: tuple):
    """Return ``module(*arguments)`` computed with ``tensors`` in place of its parameters and buffers (by name)."""
    with substituted(module, tensors):
        return module(*arguments)
