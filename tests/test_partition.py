"""Splitting layers into stages: balanced by parameters, by measured time, or at explicit starts."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from layerpipe.runtime.partition import (
    PartitionError,
    balance,
    balance_by_parameters,
    balance_by_time,
    measure_layer_times,
    partition,
)


def brute_force_best(weights, stages):
    best = None
    for cuts in itertools.combinations(range(1, len(weights)), stages - 1):
        edges = (0, *cuts, len(weights))
        largest = max(sum(weights[a:b]) for a, b in zip(edges, edges[1:]))
        best = largest if best is None else min(best, largest)
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=9), st.integers(1, 9))
def test_balance_minimises_the_largest_stage_and_covers_every_layer_once(weights, stages):
    if stages > len(weights):
        with pytest.raises(PartitionError):
            balance(weights, stages)
        return
    ranges = balance(weights, stages)
    assert len(ranges) == stages
    assert ranges[0][0] == 0 and ranges[-1][1] == len(weights)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    largest = max(sum(weights[a:b]) for a, b in ranges)
    if any(weights):
        assert largest == pytest.approx(brute_force_best(weights, stages), rel=1e-6)


def test_parameter_balance_puts_a_heavy_layer_alone():
    layers = [nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(40, 40), nn.Linear(2, 2)]
    assert balance_by_parameters(layers, 2) == ((0, 2), (2, 4))
    assert balance_by_parameters(layers, 3) == ((0, 2), (2, 3), (3, 4))


class Slow(nn.Module):
    def __init__(self, repeats):
        super().__init__()
        self.repeats = repeats
        self.linear = nn.Linear(64, 64)

    def forward(self, x):
        for _ in range(self.repeats):
            x = self.linear(x)
        return x


def test_time_balance_follows_the_cost_of_each_layer_not_its_parameter_count():
    layers = [Slow(1), Slow(1), Slow(1), Slow(40)]  # equal parameters, one layer 40 times slower
    costs = lambda layers, sample: [layer.repeats for layer in layers]  # noqa: E731 - the cost the timer would find
    assert balance_by_time(layers, 2, torch.randn(32, 64), measure=costs) == ((0, 3), (3, 4))
    assert balance_by_parameters(layers, 2) == ((0, 2), (2, 4))


def test_measured_layer_times_are_one_positive_time_per_layer_and_leave_no_gradients():
    layers = [Slow(1), nn.Tanh(), Slow(3)]
    times = measure_layer_times(layers, torch.randn(8, 64), repeats=2)
    assert len(times) == 3 and all(time > 0 for time in times)
    assert all(parameter.grad is None for layer in layers for parameter in layer.parameters())


def test_partition_by_time_measures_on_the_sample():
    layers = [Slow(1), Slow(1), Slow(1)]
    assert partition(layers, 3, "time", sample=lambda: torch.randn(4, 64)) == ((0, 1), (1, 2), (2, 3))


def test_explicit_starts_are_used_and_bad_ones_named():
    layers = [nn.Linear(2, 2) for _ in range(5)]
    assert partition(layers, 2, [0, 4]) == ((0, 4), (4, 5))
    with pytest.raises(PartitionError, match=r"partition \[0, 4, 3\]: must be 3 strictly increasing"):
        partition(layers, 3, [0, 4, 3])
    with pytest.raises(PartitionError, match="partition 'speed': must be 'parameters', 'time'"):
        partition(layers, 2, "speed")
