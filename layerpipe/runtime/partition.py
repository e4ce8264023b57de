"""Partitioning: split a model's layers into contiguous stages.

Three ways, all returning the stage boundaries as ``(start, end)`` layer
ranges:

* ``balance_by_parameters`` — the default: stages with as equal a parameter
  count as contiguity allows;
* ``balance_by_time`` — stages with as equal a measured forward+backward time;
* ``explicit_boundaries`` — the user names where each stage starts.

Balancing minimises the largest stage (the pipeline runs at the pace of its
slowest stage) by binary search over that maximum with a greedy fill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..sim.partition import Boundaries, PartitionError, balance, balance_counts, check_layer_count
from .materialise import is_meta


def parameter_counts(layers: Sequence[nn.Module]) -> list[int]:
    """Return the number of parameter elements of each layer."""
    return [sum(p.numel() for p in layer.parameters()) for layer in layers]


def balance_by_parameters(layers: Sequence[nn.Module], stages: int) -> Boundaries:
    """Return stage ranges with balanced parameter counts (a layer without parameters weighs 1 % of the mean)."""
    return balance_counts(parameter_counts(layers), stages)


def measure_layer_times(layers: Sequence[nn.Module], sample: torch.Tensor | tuple, repeats: int = 3) -> list[float]:
    """Return each layer's median forward+backward time in seconds on ``sample`` (fed through the layers in turn)."""
    times = []
    value = sample
    for layer in layers:
        arguments = value if isinstance(value, tuple) else (value,)
        arguments = tuple(a.detach().requires_grad_(a.is_floating_point()) for a in arguments)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            output = layer(*arguments)
            outputs = [o for o in (output if isinstance(output, tuple) else (output,)) if o.requires_grad]
            if outputs:
                torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
            samples.append(time.perf_counter() - start)
        times.append(sorted(samples)[len(samples) // 2])
        with torch.no_grad():
            value = layer(*arguments)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return times


def balance_by_time(
    layers: Sequence[nn.Module],
    stages: int,
    sample: torch.Tensor | tuple,
    measure: Callable[[Sequence[nn.Module], object], Sequence[float]] | None = None,
) -> Boundaries:
    """Return stage ranges with balanced forward+backward time per layer on ``sample``.

    ``measure(layers, sample)`` returns one time per layer (default:
    ``measure_layer_times``, which times the layers on this machine); tests
    inject known costs through it.
    """
    check_layer_count(len(layers), stages)
    times = (measure or measure_layer_times)(layers, sample)
    return balance(times, stages)


def explicit_boundaries(layers: int, stages: int, starts: Sequence[int]) -> Boundaries:
    """Return stage ranges starting at ``starts`` (the first layer of each stage, beginning with 0).

    Refuses starts that are not ``stages`` strictly increasing layer indices
    beginning with 0.
    """
    check_layer_count(layers, stages)
    starts = list(starts)
    if (
        len(starts) != stages
        or starts[0] != 0
        or any(b <= a for a, b in zip(starts, starts[1:]))
        or starts[-1] >= layers
    ):
        raise PartitionError(
            f"partition {starts}: must be {stages} strictly increasing first-layer indices starting at 0 "
            f"and below {layers} (one per stage)"
        )
    ends = starts[1:] + [layers]
    return tuple(zip(starts, ends))


def partition(
    layers: Sequence[nn.Module],
    stages: int,
    how: str | Sequence[int] = "parameters",
    sample: Callable[[], object] | None = None,
) -> Boundaries:
    """Return the stage ranges for ``how``: ``"parameters"``, ``"time"`` (needs ``sample``) or a list of starts.

    Refuses an unknown method, ``"time"`` without a sample input and fewer
    layers than stages, each with ``PartitionError``.  A parameter held by
    layers of two stages is tied across them (``runtime.ties``).
    """
    return _boundaries(layers, stages, how, sample)


def _boundaries(
    layers: Sequence[nn.Module], stages: int, how: str | Sequence[int], sample: Callable[[], object] | None
) -> Boundaries:
    if isinstance(how, str):
        if how == "parameters":
            return balance_by_parameters(layers, stages)
        if how == "time":
            if sample is None:
                raise PartitionError("partition 'time': needs a sample input to measure the layers with")
            if any(is_meta(layer) for layer in layers):
                raise PartitionError(
                    "partition 'time': layers on the meta device cannot be timed; use 'parameters' or a list of starts"
                )
            return balance_by_time(layers, stages, sample())
        raise PartitionError(f"partition {how!r}: must be 'parameters', 'time' or a list of stage start layers")
    return explicit_boundaries(len(layers), stages, how)
