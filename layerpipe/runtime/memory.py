"""Memory accounting: bytes of activations autograd saves, and of parameter, gradient and optimizer buffers.

``ActivationMeter`` is a pair of ``torch.autograd.graph.saved_tensors_hooks``:
every tensor autograd saves for a backward is wrapped in a small holder that
adds its bytes to a running total when saved and takes them off when the
graph that holds it is freed.  A tensor saved several times (by two
operations, or as a same-sized view) counts once; weights (parameters and
the flat stage buffers they live in) are not activations and are not
counted.  A saved slice counts its own bytes, not its whole storage's: a
micro-batch cut from the batch costs what the micro-batch holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class _Held:
    """A saved tensor, counted while autograd keeps it."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: ActivationMeter, key: tuple[int, int], tensor: torch.Tensor):
        self.meter = meter
        self.key = key
        self.tensor = tensor

    def __del__(self) -> None:
        self.meter._drop(self.key)


class ActivationMeter:
    """Live and peak bytes of saved activations; ``weight_pointers()`` returns the storages not to count."""

    def __init__(self, weight_pointers: Callable[[], Iterable[int]]):
        self.weight_pointers = weight_pointers
        self.live: dict[tuple[int, int], list[int]] = {}  # (data pointer, bytes) -> [bytes, holders]
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.current

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Return the context manager that counts tensors saved inside it."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if isinstance(tensor, nn.Parameter) or pointer == 0 or pointer in self.weight_pointers():
            return tensor
        size = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), size)
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [size, 1]
            self.current += size
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        # Held detached: a saved output holding its own grad_fn would make a cycle that outlives a retained graph.
        return _Held(self, key, tensor.detach())

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]


def note_saved(meter: ActivationMeter | None, largest: dict[int, int], stage: int, before: int) -> None:
    """Raise ``largest[stage]`` to the activation bytes ``meter`` counted as saved since it read ``before``."""
    if meter is not None:
        largest[stage] = max(largest.get(stage, 0), meter.current - before)


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Return the bytes of every tensor in the optimizers' state."""
    return sum(
        value.untyped_storage().nbytes()
        for optimizer in optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
