"""Balancing contiguous stages: the arithmetic of partitioning, without torch (the planner uses it too).

``balance`` minimises the largest stage (the pipeline runs at the pace of
its slowest stage) by binary search over that maximum with a greedy fill;
``balance_counts`` is the runtime's default, balancing parameter counts.
"""

from __future__ import annotations

from collections.abc import Sequence


class PartitionError(ValueError):
    """The layers cannot be split as asked."""


Boundaries = tuple[tuple[int, int], ...]


def check_layer_count(layers: int, stages: int) -> None:
    """Refuse, with ``PartitionError``, fewer layers than stages."""
    if layers < stages:
        raise PartitionError(
            f"the model has {layers} layers but the pipeline has {stages} stages (ranks × stages per rank): "
            f"give at least {stages} layers or use fewer ranks or stages per rank"
        )


def balance(weights: Sequence[float], stages: int) -> Boundaries:
    """Return ``stages`` contiguous, non-empty ranges over ``weights`` minimising the largest sum.

    Refuses, with ``PartitionError``, fewer weights than stages.  Among
    splits with the same largest sum, earlier stages take as much as they can.
    """
    check_layer_count(len(weights), stages)
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


def balance_counts(counts: Sequence[float], stages: int) -> Boundaries:
    """Return stage ranges with balanced ``counts`` (parameters per layer; a layer without any weighs 1 % of the mean).

    Refuses, with ``PartitionError``, fewer layers than stages.
    """
    floor = max(1.0, 0.01 * sum(counts) / max(1, len(counts)))
    return balance([max(count, floor) for count in counts], stages)
