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
from typing import Callable, Sequence

import torch
from torch import nn


class PartitionError(ValueError):
    """The layers cannot be split as asked."""


Boundaries = tuple[tuple[int, int], ...]


def _check_count(layers: int, stages: int) -> None:
    if layers < stages:
        raise PartitionError(
            f"the model has {layers} layers but the pipeline has {stages} stages (ranks × stages per rank): "
            f"give at least {stages} layers or use fewer ranks or stages per rank")


def balance(weights: Sequence[float], stages: int) -> Boundaries:
    """Return ``stages`` contiguous, non-empty ranges over ``weights`` minimising the largest sum.

    Refuses, with ``PartitionError``, fewer weights than stages.  Among
    splits with the same largest sum, earlier stages take as much as they can.
    """
    _check_count(len(weights), stages)
    weights = [max(0.0, float(w)) for w in weights]

    def fits(limit: float) -> Boundaries | None:
        ranges, start, total = [], 0, 0.0
        for index, weight in enumerate(weights):
            layers_left = len(weights) - index
            stages_left = stages - len(ranges)
            # Close the current stage when the limit would be exceeded or when every
            # remaining layer is needed to give each remaining stage one layer.
            if index > start and (total + weight > limit or layers_left < stages_left):
                ranges.append((start, index))
                start, total = index, 0.0
            total += weight
            if total > limit:
                return None
        ranges.append((start, len(weights)))
        return tuple(ranges) if len(ranges) == stages else None

    low, high = max(weights, default=0.0), sum(weights)
    best = fits(high)
    for _ in range(60):
        if high - low <= 1e-9 * max(1.0, high):
            break
        middle = (low + high) / 2
        candidate = fits(middle)
        if candidate is None:
            low = middle
        else:
            high, best = middle, candidate
    if best is None:  # only when every weight is zero: give one layer per stage, the rest to the last
        best = tuple((s, s + 1) for s in range(stages - 1)) + ((stages - 1, len(weights)),)
    return best


def parameter_counts(layers: Sequence[nn.Module]) -> list[int]:
    """Return the number of parameter elements of each layer."""
    return [sum(p.numel() for p in layer.parameters()) for layer in layers]


def balance_by_parameters(layers: Sequence[nn.Module], stages: int) -> Boundaries:
    """Return stage ranges with balanced parameter counts (a layer without parameters weighs 1 % of the mean)."""
    counts = parameter_counts(layers)
    floor = max(1.0, 0.01 * sum(counts) / max(1, len(counts)))
    return balance([max(count, floor) for count in counts], stages)


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


def balance_by_time(layers: Sequence[nn.Module], stages: int, sample: torch.Tensor | tuple,
                    measure: Callable[[Sequence[nn.Module], object], Sequence[float]] | None = None) -> Boundaries:
    """Return stage ranges with balanced forward+backward time per layer on ``sample``.

    ``measure(layers, sample)`` returns one time per layer (default:
    ``measure_layer_times``, which times the layers on this machine); tests
    inject known costs through it.
    """
    _check_count(len(layers), stages)
    times = (measure or measure_layer_times)(layers, sample)
    return balance(times, stages)


def explicit_boundaries(layers: int, stages: int, starts: Sequence[int]) -> Boundaries:
    """Return stage ranges starting at ``starts`` (the first layer of each stage, beginning with 0).

    Refuses starts that are not ``stages`` strictly increasing layer indices
    beginning with 0.
    """
    _check_count(layers, stages)
    starts = list(starts)
    if len(starts) != stages or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) \
            or starts[-1] >= layers:
        raise PartitionError(
            f"partition {starts}: must be {stages} strictly increasing first-layer indices starting at 0 "
            f"and below {layers} (one per stage)")
    ends = starts[1:] + [layers]
    return tuple(zip(starts, ends))


def partition(layers: Sequence[nn.Module], stages: int, how: str | Sequence[int] = "parameters",
              sample: Callable[[], object] | None = None) -> Boundaries:
    """Return the stage ranges for ``how``: ``"parameters"``, ``"time"`` (needs ``sample``) or a list of starts.

    Refuses an unknown method, ``"time"`` without a sample input, and fewer
    layers than stages, each with ``PartitionError``.
    """
    if isinstance(how, str):
        if how == "parameters":
            return balance_by_parameters(layers, stages)
        if how == "time":
            if sample is None:
                raise PartitionError("partition 'time': needs a sample input to measure the layers with")
            return balance_by_time(layers, stages, sample())
        raise PartitionError(f"partition {how!r}: must be 'parameters', 'time' or a list of stage start layers")
    return explicit_boundaries(len(layers), stages, how)
