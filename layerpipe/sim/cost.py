"""The cost model: how long each action takes and how many bytes it holds or moves."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

PerStage = Union[float, Sequence[float]]
"""One value for every stage, or one value per stage."""


@dataclass(frozen=True)
class CostModel:
    """Times are in any unit (seconds on a real machine, 1 = one forward by default); sizes in bytes.

    * ``forward_time``, ``backward_time``: one micro-batch through one stage;
      ``I`` takes ``input_gradient_share`` of ``backward_time`` and ``W`` the rest.
    * ``recompute_time``: an ``R`` action (default: the forward time).
    * ``optimizer_time``: a ``STEP``.
    * point-to-point: ``p2p_latency + boundary_bytes / p2p_bandwidth`` per transfer,
      where ``boundary_bytes[s]`` is stage ``s``'s output for one micro-batch.
    * data parallel, ring collectives over ``d`` replicas: all-gather and
      reduce-scatter move ``(d-1)/d`` of ``weight_bytes`` per rank, all-reduce twice that,
      each at ``dp_bandwidth`` after ``dp_latency``.
    * ``activation_bytes[s]``: what stage ``s`` stores per micro-batch for its backward.
    * ``overlap``: communication runs on its own streams; when false it occupies the compute stream.
    """

    forward_time: PerStage = 1.0
    backward_time: PerStage = 2.0
    input_gradient_share: float = 0.5
    recompute_time: PerStage | None = None
    optimizer_time: float = 0.0
    p2p_latency: float = 0.0
    p2p_bandwidth: float = math.inf
    boundary_bytes: PerStage = 0.0
    activation_bytes: PerStage = 0.0
    weight_bytes: PerStage = 0.0
    dp_latency: float = 0.0
    dp_bandwidth: float = math.inf
    overlap: bool = True


def per_stage(value: PerStage, stages: int, name: str) -> tuple[float, ...]:
    """Return ``value`` as one float per stage; refuses a sequence of the wrong length."""
    if isinstance(value, (int, float)):
        return (float(value),) * stages
    values = tuple(float(item) for item in value)
    if len(values) != stages:
        raise ValueError(f"{name}: {len(values)} values for {stages} stages")
    return values


def collective_time(kind: str, size: float, replicas: int, bandwidth: float, latency: float) -> float:
    """Return the time of a ring collective (``all_gather``, ``reduce_scatter`` or ``all_reduce``) of ``size`` bytes.

    Zero when there is one replica.
    """
    if replicas <= 1:
        return 0.0
    share = (replicas - 1) / replicas * (2 if kind == "all_reduce" else 1)
    return latency + share * size / bandwidth
