"""The cost model: how long each action takes and how many bytes it holds or moves."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..knobs import Check, ConfigError, knob, number

PerStage = float | Sequence[float]
"""One value for every stage, or one value per stage."""


def _per_stage_rule(rule: Check) -> Check:
    """Return ``rule`` applied to one value or to each value of a per-stage sequence."""

    def check(value: object) -> str | None:
        values = value if isinstance(value, (tuple, list)) else (value,)
        reasons = [rule(item) for item in values]
        found = next((reason for reason in reasons if reason is not None), None)
        return None if found is None else found + (" (for every stage)" if isinstance(value, (tuple, list)) else "")

    return check


_TIME = _per_stage_rule(number(0.0))
_BYTES = _per_stage_rule(number(0.0))
_SECONDS = number(0.0)
_BANDWIDTH = number(0.0, above=True, infinite=True)
_SPREAD = lambda value: number(0.0)(value) or ("must be at most 10" if value > 10 else None)  # noqa: E731

NEGLIGIBLE_SPREAD = 1e-6
"""A spread at most this is none: the times are not drawn."""


@dataclass(frozen=True)
class CostModel:
    """How long each action takes and how many bytes it holds or moves (see each field's help).

    Times are in any unit (seconds on a real machine, 1 = one forward by
    default); sizes in bytes.  Point-to-point transfers take ``p2p_latency +
    boundary_bytes / p2p_bandwidth``, where ``boundary_bytes[s]`` is stage
    ``s``'s output for one micro-batch.  Data-parallel collectives are rings
    over ``d`` replicas: all-gather and reduce-scatter move ``(d-1)/d`` of
    ``weight_bytes`` per rank, all-reduce twice that, each at
    ``data_parallel_bandwidth`` after ``data_parallel_latency``.  A per-stage value is one number
    for every stage or one per stage (comma-separated on the command line).
    """

    forward_time: PerStage = knob(
        1.0,
        "forward of one micro-batch through one stage (one value, or one per stage, comma-separated)",
        check=_TIME,
        metavar="T",
    )
    backward_time: PerStage = knob(
        2.0,
        "full backward (B) of one micro-batch through one stage (one value, or one per stage, comma-separated)",
        check=_TIME,
        metavar="T",
    )
    input_gradient_share: float = knob(
        0.5,
        "share of the backward spent on the input gradient I (zero-bubble); W takes the rest",
        check=lambda v: number(0.0)(v) or ("must be at most 1" if v > 1 else None),
        metavar="SHARE",
    )
    recompute_time: PerStage | None = knob(
        None,
        "one recompute R (one value, or one per stage, comma-separated)",
        check=lambda v: None if v is None else _TIME(v),
        metavar="T",
        default_text="the forward time",
    )
    optimizer_time: float = knob(0.0, "optimizer step (STEP) of one stage", check=_SECONDS, metavar="T")
    clip_time: float = knob(
        0.0,
        "a CLIP's work on one stage (its part of the squared gradient norm and the scaling), added to the "
        "all-reduce's latency (p2p_latency)",
        check=_SECONDS,
        metavar="T",
    )
    action_overhead: float = knob(
        0.0,
        "time a rank spends between two of its actions (dispatch and bookkeeping), added to each compute action",
        check=_SECONDS,
        metavar="T",
    )
    send_time: float = knob(
        0.0,
        "time a SEND holds its rank while it is issued (copying the message out), before the transfer goes on alone",
        check=_SECONDS,
        metavar="T",
    )
    receive_time: float = knob(
        0.0, "time a RECV holds its rank once its message has arrived (taking it in)", check=_SECONDS, metavar="T"
    )
    p2p_latency: float = knob(
        0.0, "latency of one point-to-point transfer between pipeline ranks", check=_SECONDS, metavar="T"
    )
    p2p_bandwidth: float = knob(
        math.inf, "bytes per time unit between pipeline ranks", check=_BANDWIDTH, metavar="BYTES"
    )
    boundary_bytes: PerStage = knob(
        0.0,
        "bytes of a stage's output for one micro-batch (one value, or one per stage, comma-separated)",
        check=_BYTES,
        metavar="BYTES",
    )
    activation_bytes: PerStage = knob(
        0.0,
        "bytes a stage stores per micro-batch for its backward (one value, or one per stage, comma-separated)",
        check=_BYTES,
        metavar="BYTES",
    )
    weight_bytes: PerStage = knob(
        0.0,
        "bytes of one stage's weights (and of its gradients) (one value, or one per stage, comma-separated)",
        check=_BYTES,
        metavar="BYTES",
    )
    tie_bytes: float = knob(
        0.0,
        "bytes of the gradients of each tie group's parameters (tied across stages), summed once per step by an "
        "all-reduce over the group's ranks (p2p latency and bandwidth; nothing where one rank holds them all)",
        check=_BYTES,
        metavar="BYTES",
    )
    data_parallel_latency: float = knob(0.0, "latency of one data-parallel collective", check=_SECONDS, metavar="T")
    data_parallel_bandwidth: float = knob(
        math.inf, "bytes per time unit of the data-parallel link", check=_BANDWIDTH, metavar="BYTES"
    )
    variation: float = knob(
        0.0,
        "spread of each compute action's time (standard deviation over mean); above 0 the "
        "simulator draws each time from a gamma distribution of that spread (seeded) and the "
        "steady step averages many steps",
        check=_SPREAD,
        metavar="SPREAD",
    )
    hold_variation: float = knob(
        0.0,
        "spread of the time a SEND or RECV holds its rank (standard deviation over "
        "mean); above 0 the simulator draws each hold from a gamma distribution of that "
        "spread (seeded), as it does compute times with --variation",
        check=_SPREAD,
        metavar="SPREAD",
    )
    overlap: bool = knob(
        True, "communication runs on its own streams; with --no-overlap it occupies the compute stream"
    )
    overlap_pairs: bool = knob(
        False,
        "an overlapped pair (OVERLAP_F_B, dualpipe-v) takes the longer of its forward and backward halves, as when "
        "an overlap function runs them together; by default it takes their sum, the halves one after the other",
    )


def draws(cost: CostModel) -> bool:
    """Return whether the simulator draws times for ``cost``: a compute spread above the negligible, or a hold
    spread with holds to draw."""
    holds = cost.send_time > 0 or cost.receive_time > 0
    return cost.variation > NEGLIGIBLE_SPREAD or (holds and cost.hold_variation > NEGLIGIBLE_SPREAD)


def at_means(cost: CostModel) -> CostModel:
    """Return ``cost`` without its spreads: one simulation of it is the means', not one noisy draw."""
    return dataclasses.replace(cost, variation=0.0, hold_variation=0.0)


def per_stage(value: PerStage, stages: int, name: str) -> tuple[float, ...]:
    """Return ``value`` as one float per stage; refuses a sequence of the wrong length with ``ConfigError``."""
    if isinstance(value, (int, float)):
        return (float(value),) * stages
    values = tuple(float(item) for item in value)
    if len(values) != stages:
        raise ConfigError(
            name, tuple(value), f"{len(values)} values for {stages} stages: give one value, or one per stage"
        )
    return values


def collective_time(kind: str, size: float, replicas: int, bandwidth: float, latency: float) -> float:
    """Return the time of a ring collective (``all_gather``, ``reduce_scatter`` or ``all_reduce``) of ``size`` bytes.

    Zero when there is one replica.
    """
    if replicas <= 1:
        return 0.0
    share = (replicas - 1) / replicas * (2 if kind == "all_reduce" else 1)
    return latency + share * size / bandwidth
