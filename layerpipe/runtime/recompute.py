"""Activation recomputation: regions of a forward that keep only their inputs and are run again by an ``R`` action.

A *region* is one call of a function (a stage, or a part of a layer such as
the attention internals of the reference GPT) made through ``recomputed``
while a ``Recording`` is active.  Its forward runs without building a graph
and autograd saves only the region's inputs.  ``Recording.recompute`` — what
the executor does for ``sRi`` — runs every region of that stage and
micro-batch again with gradients, from the saved inputs and the random
number state of the first run, and keeps the rebuilt graph; the backward of
the region then goes through it.  So intermediate activations exist only
between ``R`` and the backward that consumes them.

Stage modes (``schedule.config.RECOMPUTE_MODES``, the one list): ``none``; ``full`` — the whole stage is one region (it stores
its input only); ``selective`` — only the regions its layers mark (cheap to
recompute, expensive to store) are dropped.  A layer marks a region by
holding a submodule whose class sets ``recompute_region = True``;
``mark_regions`` makes each such submodule's calls go through
``recomputed``, so a model needs no import from the runtime.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .stage import as_tuple, carries_gradient


class Region:
    """One call of a recomputed function: its parameters, random state and, after ``recompute``, the rebuilt graph."""

    def __init__(self, function: Callable, parameters: tuple[torch.Tensor, ...]):
        self.function = function
        self.parameters = parameters
        self.returns_tuple = False
        self.context = None  # weak reference to the autograd node, which holds the saved inputs
        self.random_state = torch.get_rng_state()
        self.cuda_devices: list[int] = []
        self.cuda_states: list[torch.Tensor] = []
        self.leaves: tuple[torch.Tensor, ...] | None = None
        self.outputs: tuple[torch.Tensor, ...] | None = None

    def remember_cuda(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.cuda_devices = sorted({t.device.index for t in inputs if t.is_cuda})
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    def recompute(self, saved: tuple[torch.Tensor, ...] | None = None) -> None:
        """Run the function again with gradients from the saved inputs; keep inputs and outputs of the new graph."""
        if saved is None:
            saved = self.context().saved_tensors
        leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in saved)
        with torch.random.fork_rng(devices=self.cuda_devices), torch.enable_grad():
            torch.set_rng_state(self.random_state)
            for device, state in zip(self.cuda_devices, self.cuda_states):
                torch.cuda.set_rng_state(state, device)
            self.outputs = as_tuple(self.function(*leaves))
        self.leaves = leaves


class _Recomputed(torch.autograd.Function):
    """Forward without a graph, saving only the inputs; backward through the graph ``Region.recompute`` rebuilt."""

    @staticmethod
    def forward(ctx, region: Region, count: int, *tensors: torch.Tensor):
        inputs = tensors[:count]
        ctx.save_for_backward(*inputs)
        ctx.region = region
        ctx.count = count
        region.context = weakref.ref(ctx)
        region.remember_cuda(inputs)
        produced = region.function(*inputs)
        region.returns_tuple = isinstance(produced, tuple)
        outputs = as_tuple(produced)
        ctx.mark_non_differentiable(*(o for o in outputs if not carries_gradient(o.dtype)))
        return outputs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        region = ctx.region
        if region.outputs is None:  # used outside a pipeline program: recompute on demand
            region.recompute(ctx.saved_tensors)
        roots = [(o, g) for o, g in zip(region.outputs, grads) if g is not None and o.requires_grad]
        targets = [t for t in region.leaves + region.parameters if t.requires_grad]
        if not roots or not targets:
            return (None, None) + (None,) * (len(region.leaves) + len(region.parameters))
        found = iter(
            torch.autograd.grad(
                [o for o, _ in roots], targets, [g for _, g in roots], allow_unused=True, retain_graph=True
            )
        )
        gradients = [next(found) if t.requires_grad else None for t in region.leaves + region.parameters]
        return (None, None, *gradients)


class Recording:
    """The regions of one stage's forward of one micro-batch, in the order they ran."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    def recompute(self) -> None:
        """Rebuild the graph of every region (the executor's ``R``)."""
        for region in self.regions:
            region.recompute()

    def release(self) -> None:
        """Free the rebuilt graphs once the backward that needed them is done.

        The autograd node of a region may outlive the backward (an output
        tensor still refers to it), so its graph is dropped here, by the
        program, rather than whenever the node happens to die.
        """
        for region in self.regions:
            region.leaves = region.outputs = None
        self.regions = []


_active: Recording | None = None


@contextmanager
def recording(target: Recording) -> Iterator[Recording]:
    """Make ``recomputed`` calls inside the block regions of ``target``."""
    global _active
    previous, _active = _active, target
    try:
        yield target
    finally:
        _active = previous


def recomputed(function: Callable, *inputs: torch.Tensor, owner: nn.Module | None = None):
    """Return ``function(*inputs)``; inside a ``recording`` with gradients enabled, as a recomputed region.

    ``function`` may be an ``nn.Module`` (or a function of ``owner``): the
    module's parameters that require a gradient get their gradients through
    the region.  Outside a recording (a plain forward, evaluation) this is an
    ordinary call, so a model whose regions are marked runs unchanged anywhere.
    """
    if _active is None or not torch.is_grad_enabled():
        return function(*inputs)
    source = owner if owner is not None else function
    parameters = tuple(p for p in source.parameters() if p.requires_grad) if isinstance(source, nn.Module) else ()
    region = Region(function, parameters)
    _active.regions.append(region)
    outputs = _Recomputed.apply(region, len(inputs), *inputs, *parameters)
    return outputs if region.returns_tuple else outputs[0]


def mark_regions(module: nn.Module) -> int:
    """Route the calls of every submodule whose class sets ``recompute_region = True`` through ``recomputed``.

    Returns how many submodules are marked regions.  Marking twice changes
    nothing.  The submodule's ``forward`` is replaced on the instance by a
    ``RegionForward``, which a deep copy or a pickle of the layers carries
    along bound to the copy (outside a recording it is an ordinary call).
    """
    count = 0
    for submodule in module.modules():
        if getattr(type(submodule), "recompute_region", False) is not True:
            continue
        count += 1
        if not isinstance(vars(submodule).get("forward"), RegionForward):
            submodule.forward = RegionForward(submodule)
    return count


class RegionForward:
    """The ``forward`` of a marked submodule: its class's ``forward``, called through ``recomputed``.

    A plain object rather than a closure, so that ``copy.deepcopy`` binds
    the copy's calls to the copy (not to the original module) and the
    layers still pickle.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *inputs: torch.Tensor):
        return recomputed(type(self.module).forward.__get__(self.module), *inputs, owner=self.module)
