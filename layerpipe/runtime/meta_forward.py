"""Forwards that leave no trace: a stage run on fake (meta) tensors, and a real forward that undoes its side effects.

The shape agreement needs each stage's output shapes and dtypes, not its
values.  ``fake_forward`` runs the stage under PyTorch's ``FakeTensorMode``:
every parameter, buffer and input is replaced by a tensor with the same
shape, dtype and device but no storage, so nothing is computed, no buffer
or parameter is touched and no random number is drawn, while autocast
still applies (a fake tensor says it lives on the real device).  A layer
that needs values (``.item()``, boolean masks, ``nonzero``, collectives of
spatial layers) cannot run fake; ``restoring`` wraps the real forward used
instead and puts back the buffers and random states it changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .precision import compute
from .spatial_split import has_spatial_layers
from .stage import PipelineError, Stage, TensorMeta
from .substitute import call_with


class CannotRunFake(Exception):
    """A stage could not run on fake tensors; the message says why."""


def fake_mode() -> FakeTensorMode:
    """Return a fresh fake-tensor mode (real constants met inside a layer are faked on the fly)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_inputs(mode: FakeTensorMode, tensors: Iterable[torch.Tensor], device: torch.device) -> tuple:
    """Return fake copies of ``tensors`` on ``device`` (no data is copied or moved)."""
    fakes = tuple(mode.from_tensor(tensor) for tensor in tensors)
    with mode:
        return tuple(fake.to(device) for fake in fakes)


def fake_tensors(mode: FakeTensorMode, metas: Iterable[TensorMeta], device: torch.device) -> tuple:
    """Return fake tensors described by ``metas`` on ``device``."""
    with mode:
        return tuple(torch.empty(meta.shape, dtype=meta.dtype, device=device) for meta in metas)


def fake_forward(mode: FakeTensorMode, stage: Stage, inputs: tuple, precision: str, device: torch.device) -> tuple:
    """Return the stage's outputs (fake) for fake ``inputs``, computed on fake copies of its weights and buffers.

    Raises ``CannotRunFake`` naming the cause when a layer needs values;
    ``PipelineError`` (a refused layer output) passes through.
    """
    if has_spatial_layers(stage.layers):
        raise CannotRunFake("it holds spatial layers, which exchange rows with their neighbours")
    state = {name: mode.from_tensor(tensor) for name, tensor in _named_state(stage)}
    try:
        with mode, torch.no_grad(), compute(precision, device):
            return call_with(stage, state, inputs)
    except PipelineError:
        raise
    except Exception as error:
        raise CannotRunFake(f"{type(error).__name__}: {_first_line(error)}") from error


@contextmanager
def restoring(modules: Iterable[nn.Module], device: torch.device) -> Iterator[None]:
    """Run the body, then put back the modules' buffers and the random states (CPU and ``device``'s) it changed."""
    modules = list(modules)
    buffers = [(buffer, buffer.detach().clone()) for module in modules for buffer in module.buffers()]
    cpu_state = torch.get_rng_state()
    device_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_state)
        if device_state is not None:
            torch.cuda.set_rng_state(device_state, device)


def _named_state(stage: Stage) -> Iterator[tuple[str, torch.Tensor]]:
    yield from stage.named_parameters()
    yield from stage.named_buffers()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
