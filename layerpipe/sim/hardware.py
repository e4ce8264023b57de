"""Hardware the planner plans for: a cluster preset with its figures' sources, or this machine from a cost file.

A ``Hardware`` says how fast one device computes and how fast devices
talk, inside a node and between nodes.  The presets are data-sheet figures
times a sustained fraction; every figure names its source, and the
fractions and latencies that no data sheet gives are marked as this
project's assumptions.  ``hardware_from_cost_file`` turns a cost file that
``layerpipe calibrate`` measured into the same figures for this machine.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field

from ..knobs import ConfigError
from ..schedule.config import SPLITTING_SCHEDULES
from .cost import CostModel
from .gpt_costs import SIZES, GPTShape, layer_forward_flops, layer_parameters
from .partition import balance_counts


@dataclass(frozen=True)
class Hardware:
    """How fast one device computes and how fast devices exchange data (seconds, bytes, FLOP).

    ``flops`` is the sustained rate of a transformer's matrix products in
    the compute precision; ``backward_ratio`` the backward's time over the
    forward's.  Links: ``intra_node_*`` between devices of one node,
    ``inter_node_*`` per device between nodes.  ``cores`` is set for a CPU
    machine whose processes share ``cores`` cores (see ``core_slowdown``);
    its ``flops`` are then one process's alone.  ``rates`` are ``(sequences
    per micro-batch, rate relative to flops)`` pairs, sizes ascending (a
    CPU computes faster per sequence on larger micro-batches);
    ``split_backward`` is how much longer a backward split into input and
    weight gradients takes than a whole one.
    ``send_time`` and ``receive_time`` are what a message costs the
    process that sends or receives it (measured on a CPU machine; part of
    ``action_overhead`` on the presets).
    """

    name: str
    flops: float
    memory_bandwidth: float
    devices_per_node: int
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    intra_node_latency: float
    inter_node_latency: float
    collective_latency: float
    action_overhead: float
    precision: str = "bf16"
    backward_ratio: float = 2.0
    cores: int | None = None
    send_time: float = 0.0
    receive_time: float = 0.0
    rates: tuple[tuple[int, float], ...] = ()
    split_backward: float = 1.0
    sources: tuple[str, ...] = field(default=(), compare=False)

    @property
    def activation_element_bytes(self) -> int:
        """Return the bytes of one activation element in the compute precision."""
        return 4 if self.precision == "fp32" else 2

    def rate_at(self, size: int) -> float:
        """Return the compute rate at micro-batches of ``size`` sequences relative to ``flops`` (interpolated
        between the measured sizes in log scale, the nearest outside them; 1 without measurements)."""
        return _interpolated(self.rates, size) if self.rates else 1.0

    def core_slowdown(self, processes: int, busy_share: float) -> float:
        """Return how much slower each of ``processes`` computes than alone when each computes ``busy_share`` of
        the time and they share ``cores`` cores fairly (1 without ``cores``)."""
        if self.cores is None:
            return 1.0
        return max(1.0, processes * busy_share / self.cores)

    def link(self, neighbours_in_node: bool) -> tuple[float, float]:
        """Return ``(latency, bandwidth)`` of a link inside one node or between nodes."""
        if neighbours_in_node:
            return self.intra_node_latency, self.intra_node_bandwidth
        return self.inter_node_latency, self.inter_node_bandwidth


_SUSTAINED = 0.5
"""Share of the data-sheet bf16 rate a transformer's matrix products sustain: Narayanan et al. (SC21) report 52 % of
peak per A100 for their trillion-parameter run; this project takes 50 % for both presets (an assumption for H100)."""

PRESETS: dict[str, Hardware] = {
    "a100": Hardware(
        name="a100",
        flops=_SUSTAINED * 312e12,
        memory_bandwidth=2.039e12,
        devices_per_node=8,
        intra_node_bandwidth=300e9,
        inter_node_bandwidth=25e9,
        intra_node_latency=5e-6,
        inter_node_latency=10e-6,
        collective_latency=30e-6,
        action_overhead=20e-6,
        sources=(
            "NVIDIA A100 80GB SXM data sheet: 312 TFLOPS bf16 dense, 2,039 GB/s HBM2e, NVLink 600 GB/s "
            "(300 GB/s each way)",
            "NVIDIA DGX A100: eight 200 Gb/s HDR InfiniBand adapters for eight GPUs, 25 GB/s per GPU each way",
            "Narayanan et al., SC21 (arXiv 2104.04473): 52 % of peak sustained per GPU",
            "latencies and per-action overhead: this project's assumptions",
        ),
    ),
    "h100": Hardware(
        name="h100",
        flops=_SUSTAINED * 989.4e12,
        memory_bandwidth=3.35e12,
        devices_per_node=8,
        intra_node_bandwidth=450e9,
        inter_node_bandwidth=50e9,
        intra_node_latency=5e-6,
        inter_node_latency=10e-6,
        collective_latency=30e-6,
        action_overhead=20e-6,
        sources=(
            "NVIDIA H100 SXM5 (glennklockwood.com/garden/processors/h100, from NVIDIA's data sheet): "
            "989.4 TFLOPS bf16 dense, 3.35 TB/s HBM3, NVLink 900 GB/s (450 GB/s each way)",
            "NVIDIA DGX H100: eight 400 Gb/s NDR InfiniBand adapters for eight GPUs, 50 GB/s per GPU each way",
            "sustained share 50 % and latencies: this project's assumptions",
        ),
    ),
}
"""Cluster presets by name: eight GPUs per node on NVLink, one InfiniBand adapter per GPU between nodes."""


def hardware_from_cost_file(path: str, cost: CostModel, option: str = "cost_file") -> Hardware:
    """Return this machine's figures from the cost file at ``path`` (already read into ``cost``).

    The compute rate is the model's forward FLOP per micro-batch over the
    measured forward times, times the ``[about]`` contention (how much
    slower the processes computed, sharing cores, than alone), the backward ratio the measured one; links and
    collectives are the measured ones for every distance (one machine).
    Refuses, with ``ConfigError`` on ``option``, a file without the
    ``[about]`` figures ``layerpipe calibrate`` writes for the GPT.
    """
    about = _about(path, option)
    split = _at_least_one(about, "split_backward", path, option)  # a zero-bubble run's backwards hold it already
    shape = GPTShape(**{key: int(about[key]) for key in SIZES})
    microbatch_size = int(about["batch_size"]) // (int(about["microbatches"]) * int(about["data_parallel"]))
    stages = int(about["ranks"]) * int(about["stages_per_rank"])
    forward = _per_stage(cost.forward_time, stages, path, option)
    backward = _per_stage(cost.backward_time, stages, path, option)
    flops = layer_forward_flops(shape, microbatch_size)
    boundaries = balance_counts(layer_parameters(shape), stages)
    stage_flops = [sum(flops[start:end]) for start, end in boundaries]
    if sum(forward) <= 0:
        raise ConfigError(option, path, "its forward times are zero: measure them with layerpipe calibrate")
    latency, bandwidth = cost.p2p_latency, cost.p2p_bandwidth
    weights = _per_stage(cost.weight_bytes, stages, path, option)
    shards = int(about["data_parallel"]) if int(about.get("zero", 0)) else 1  # STEP updates a shard from ZeRO-1 on
    optimizer_bandwidth = 7 * max(weights) / shards / cost.optimizer_time if cost.optimizer_time > 0 else math.inf
    return Hardware(
        name=f"this machine ({about.get('machine', 'calibrated')})",
        flops=sum(stage_flops) / sum(forward) * _at_least_one(about, "contention", path, option),
        memory_bandwidth=optimizer_bandwidth,
        devices_per_node=10**9,
        intra_node_bandwidth=bandwidth,
        inter_node_bandwidth=bandwidth,
        intra_node_latency=latency,
        inter_node_latency=latency,
        collective_latency=cost.data_parallel_latency,
        action_overhead=cost.action_overhead,
        precision="fp32",
        backward_ratio=sum(backward) / sum(forward) / (split if about.get("schedule") in SPLITTING_SCHEDULES else 1.0),
        cores=int(about.get("cores", 0)) or None,
        rates=_rates(about, microbatch_size, path, option),
        split_backward=split,
        send_time=cost.send_time,
        receive_time=cost.receive_time,
        sources=(f"measured by layerpipe calibrate on {about.get('date', 'an unknown date')}: {path}",),
    )


def _interpolated(pairs: tuple[tuple[int, float], ...], size: int) -> float:
    """Return the value at ``size`` of ``(size, value)`` pairs, sizes ascending: interpolated in log scale between
    them, the nearest outside them."""
    sizes = [measured for measured, _ in pairs]
    if size <= sizes[0] or size >= sizes[-1]:
        return pairs[0][1] if size <= sizes[0] else pairs[-1][1]
    upper = next(index for index, measured in enumerate(sizes) if measured >= size)
    (low, low_value), (high, high_value) = pairs[upper - 1], pairs[upper]
    weight = math.log(size / low) / math.log(high / low)
    return low_value + weight * (high_value - low_value)


def _at_least_one(about: dict, key: str, path: str, option: str) -> float:
    """Return the ``[about]`` figure ``key`` (1 when absent); refuse, with ``ConfigError``, one below 1."""
    value = about.get(key, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1.0 <= value < math.inf:
        raise ConfigError(option, path, f"its [about] {key} = {value!r} must be a finite number of at least 1")
    return float(value)


def _rates(about: dict, calibrated_size: int, path: str, option: str) -> tuple[tuple[int, float], ...]:
    """Return the ``[about]`` alone forward times as rates per sequence relative to the calibrated micro-batch's
    (none when absent); refuse, with ``ConfigError``, lists that are not sizes ascending and positive times."""
    sizes, times = about.get("alone_sizes"), about.get("alone_forward")
    if sizes is None and times is None:
        return ()
    valid = (
        isinstance(sizes, list)
        and isinstance(times, list)
        and len(sizes) == len(times) > 0
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
        and sizes == sorted(set(sizes))
        and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < math.inf for t in times)
    )
    if not valid:
        raise ConfigError(
            option,
            path,
            f"its [about] alone_sizes = {sizes!r} and alone_forward = {times!r} must be "
            f"ascending whole numbers and as many positive times",
        )
    per_sequence = [size / time for size, time in zip(sizes, times)]
    reference = _interpolated(tuple(zip(sizes, per_sequence)), calibrated_size)
    return tuple((size, rate / reference) for size, rate in zip(sizes, per_sequence))


_NEEDED = (
    *SIZES,
    "batch_size",
    "microbatches",
    "data_parallel",
    "ranks",
    "stages_per_rank",
    "processes",
)


def _about(path: str, option: str) -> dict:
    """Return the cost file's ``[about]`` table; refuse, with ``ConfigError``, one the planner cannot read."""
    with open(path, "rb") as handle:
        about = tomllib.load(handle).get("about", {})
    missing = [key for key in _NEEDED if key not in about]
    if missing or about.get("model", "gpt") != "gpt":
        raise ConfigError(
            option,
            path,
            f"its [about] table lacks {', '.join(missing) or 'a gpt model'}: the planner "
            f"needs a cost file written by `layerpipe calibrate` for the GPT demo",
        )
    bad = next(
        (key for key in _NEEDED if isinstance(about[key], bool) or not isinstance(about[key], int) or about[key] < 1),
        None,
    )
    if bad is not None:
        raise ConfigError(option, path, f"its [about] {bad} = {about[bad]!r} must be a whole number of at least 1")
    if about["batch_size"] % (about["microbatches"] * about["data_parallel"]):
        raise ConfigError(
            option,
            path,
            f"its [about] batch_size ({about['batch_size']}) must be a multiple of microbatches × data_parallel",
        )
    return about


def _per_stage(value, stages: int, path: str, option: str) -> list[float]:
    values = [float(value)] * stages if isinstance(value, (int, float)) else [float(item) for item in value]
    if len(values) != stages:
        raise ConfigError(
            option, path, f"{len(values)} per-stage values for the {stages} stages its [about] table describes"
        )
    return values
