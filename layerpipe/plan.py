"""The planner: search pipeline configurations for a GPT on many GPUs by simulating them.

``plan(request)`` enumerates pipeline size ``p`` and data-parallel size
``d = gpus / p``, the micro-batch size and count, the schedule with its
stages per rank and group size, the ZeRO level, recomputation and reduce
portions; it turns each into a cost model (``sim.gpt_costs`` on
``sim.hardware``), refuses what does not fit in memory (``sim.memory``, the
rules the runtime follows) and simulates the rest (``sim.simulator``).

The search is branch and bound: every candidate's busiest rank computes
for a time that no schedule can beat (its ideal time), so candidates are
simulated from the lowest ideal time up, and the search stops once the next
ideal time is slower than the best few simulated steps.  Schedules and
simulations are cached.  Nothing here imports torch.

Layout assumed on a cluster: the ``d`` replicas of a stage are neighbours
(their collectives stay inside a node when ``d`` fits in one), and pipeline
ranks are ``d`` devices apart (their messages cross nodes once ``p·d``
exceeds a node).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import tomllib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from .knobs import ConfigError, knob, number, one_of, whole
from .schedule.actions import Action, Kind
from .schedule.build import build_schedule, compute_programs, make_placement
from .schedule.bulk import collector_paused
from .schedule.config import ScheduleConfig, validate_config
from .schedule.lowering import add_optimizer_steps, add_recompute, add_weight_gathers
from .sim.cost import CostModel
from .sim.cost_file import read_cost_file, toml_value
from .sim.gpt_costs import (
    GPTShape,
    boundary_bytes,
    layer_activation_bytes,
    layer_forward_flops,
    layer_parameters,
    layer_recompute_flops,
    stage_sums,
)
from .sim.hardware import PRESETS, Hardware, hardware_from_cost_file
from .sim.memory import activation_peak, buffer_peak
from .sim.partition import balance_counts
from .sim.simulator import simulate

GIB = 2.0**30

MODELS = {
    "demo": GPTShape(vocab_size=80, block_size=64, width=128, heads=4, blocks=4),
    "gpt-52b": GPTShape(vocab_size=51200, block_size=2048, width=8192, heads=64, blocks=64),
}
"""Named models: ``demo`` is ``layerpipe train``'s GPT on the 80 characters of Shakespeare's plays; ``gpt-52b`` the 52-billion-
parameter GPT of Lamy-Poirier's breadth-first paper (64 layers of width 8192, 2048 tokens; 64 heads and the GPT-2
vocabulary padded to 51,200 are this project's choices)."""

NEAR_TIE = 0.03
"""Predictions this close to the fastest count as a tie (the simulator is no more accurate than that): among them
the planner picks the simplest configuration."""

USABLE_MEMORY = 0.9
"""Share of a GPU's memory the planner fills: the rest is left to the framework's context, workspaces and
fragmentation."""


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for (see each field's help)."""

    model: str = knob(
        "demo",
        "the GPT: demo (layerpipe train's), gpt-52b, or a TOML file with block_size, width, "
        "heads, blocks and vocab_size (a train --config file works)",
        metavar="CONFIG",
    )
    gpus: int = knob(
        2, "devices (processes) to use: pipeline ranks × data-parallel replicas", check=whole(1), metavar="N"
    )
    gpu_memory: float = knob(80.0, "memory of one device in GiB", check=number(0.0, above=True), metavar="GIB")
    global_batch: int = knob(32, "sequences per step over all replicas", check=whole(1), metavar="B")
    cluster: str = knob(
        "h100",
        "hardware figures: " + ", ".join(PRESETS) + " (eight GPUs per node on NVLink, "
        "InfiniBand between nodes); a --cost-file replaces them",
        check=one_of(tuple(PRESETS)),
        metavar="NAME",
    )
    cost_file: str | None = knob(
        None,
        "plan for the machine this cost file was measured on (layerpipe calibrate)",
        metavar="FILE",
        default_text="none: use --cluster",
    )
    top: int = knob(5, "configurations to print, best first", check=whole(1), metavar="K")
    max_stages_per_rank: int = knob(8, "largest number of stages per rank to try", check=whole(1), metavar="V")
    max_microbatch_size: int = knob(16, "largest micro-batch (sequences) to try", check=whole(1), metavar="N")
    jobs: int = knob(
        0, "processes that simulate candidates side by side (0: one per core)", check=whole(0), metavar="J"
    )
    output: str = knob(
        "plan.toml", "write the best configuration here, as a layerpipe train --config file", metavar="FILE.toml"
    )


@dataclass(frozen=True)
class Candidate:
    """One configuration: the schedule's knobs and the micro-batch size (sequences)."""

    schedule: ScheduleConfig
    microbatch_size: int


@dataclass(frozen=True)
class PlanEntry:
    """A simulated configuration: its step time and throughput, memory per device, bubble and exposed communication."""

    candidate: Candidate
    step_time: float
    tokens_per_second: float
    memory: float
    bubble: float
    exposed_communication: float


@dataclass(frozen=True)
class PlanResult:
    """The best entries, best first, and how many candidates the search saw, refused for memory and simulated."""

    best: tuple[PlanEntry, ...]
    candidates: int
    too_big: int
    simulated: int
    hardware: Hardware
    shape: GPTShape


def model_shape(model: str) -> GPTShape:
    """Return the GPT named by ``model`` (a name in ``MODELS`` or a TOML file's sizes).

    Refuses, with ``ConfigError`` on ``model``, an unknown name, an
    unreadable file and sizes that are not positive whole numbers or whose
    heads do not divide the width.
    """
    if model in MODELS:
        return MODELS[model]
    if not os.path.isfile(model):
        raise ConfigError(
            "model",
            model,
            f"choose one of {', '.join(MODELS)}, or give a TOML file with block_size, "
            f"width, heads, blocks and vocab_size",
        )
    try:
        with open(model, "rb") as handle:
            values = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError("model", model, f"cannot be read as TOML ({error})") from None
    sizes = {
        **dataclasses.asdict(MODELS["demo"]),
        **{key: values[key] for key in ("vocab_size", "block_size", "width", "heads", "blocks") if key in values},
    }
    bad = next(
        (key for key, value in sizes.items() if isinstance(value, bool) or not isinstance(value, int) or value < 1),
        None,
    )
    if bad is not None:
        raise ConfigError("model", model, f"its {bad} = {sizes[bad]!r} must be a whole number of at least 1")
    if sizes["width"] % sizes["heads"]:
        raise ConfigError("model", model, f"its heads ({sizes['heads']}) must divide its width ({sizes['width']})")
    return GPTShape(**sizes)


def hardware_of(request: PlanRequest) -> Hardware:
    """Return the hardware figures: the cost file's (this machine) or the cluster preset's."""
    if request.cost_file is None:
        return PRESETS[request.cluster]
    return hardware_from_cost_file(request.cost_file, read_cost_file(request.cost_file), "cost_file")


# ---------------------------------------------------------------- candidates
def _divisors(number_: int) -> list[int]:
    return [k for k in range(1, number_ + 1) if number_ % k == 0]


def _schedules(ranks: int, microbatches: int, layers: int, max_stages_per_rank: int) -> Iterator[dict]:
    """Yield the schedule knobs to try on ``ranks`` pipeline ranks: name, stages per rank and group size."""
    yield {"schedule": "gpipe"}
    if ranks == 1:
        return
    yield {"schedule": "1f1b"}
    yield {"schedule": "zero-bubble", "stages_per_rank": 1}
    for stages_per_rank in range(2, min(max_stages_per_rank, layers // ranks) + 1):
        for name in ("interleaved", "breadth-first", "zero-bubble"):
            yield {"schedule": name, "stages_per_rank": stages_per_rank}
        group = 2 * ranks
        while group < microbatches:
            yield {"schedule": "grouped", "stages_per_rank": stages_per_rank, "group_size": group}
            group *= 2


def _sharding(data_parallel: int) -> Iterator[dict]:
    """Yield the ZeRO levels and reduce portions to try with ``data_parallel`` replicas."""
    if data_parallel == 1:
        yield {}
        return
    for zero in range(4):
        for portions in (1, 4):
            yield {"zero": zero, "reduce_portions": portions}


def candidates(request: PlanRequest, shape: GPTShape) -> Iterator[Candidate]:
    """Yield every valid configuration for ``request``: each layout, micro-batch size, schedule, sharding and
    recomputation that ``validate_config`` accepts."""
    for ranks in _divisors(request.gpus):
        data_parallel = request.gpus // ranks
        if ranks > shape.layers or request.global_batch % data_parallel:
            continue
        per_replica = request.global_batch // data_parallel
        for size in (s for s in _divisors(per_replica) if s <= request.max_microbatch_size):
            microbatches = per_replica // size
            for knobs_ in _schedules(ranks, microbatches, shape.layers, request.max_stages_per_rank):
                for sharding in _sharding(data_parallel):
                    for recompute in (
                        ("none", "selective", "full") if ranks * knobs_.get("stages_per_rank", 1) > 1 else ("none",)
                    ):
                        config = ScheduleConfig(
                            ranks=ranks,
                            microbatches=microbatches,
                            data_parallel=data_parallel,
                            recompute=recompute,
                            **knobs_,
                            **sharding,
                        )
                        try:
                            validate_config(config)
                        except ConfigError:
                            continue
                        yield Candidate(config, size)


# ---------------------------------------------------------------- costs and memory
@dataclass(frozen=True)
class _Costs:
    """A candidate's cost model and the per-stage figures its memory needs."""

    cost: CostModel
    full_activation: tuple[float, ...]
    stored_activation: tuple[float, ...]
    weights: tuple[float, ...]


@lru_cache(maxsize=65536)
def _costs(
    shape: GPTShape,
    hardware: Hardware,
    ranks: int,
    stages: int,
    data_parallel: int,
    size: int,
    recompute: tuple[str, ...],
    optimizer_shards: int,
    slowdown: float = 1.0,
    split: bool = False,
) -> _Costs:
    """Return the cost model of ``stages`` balanced stages of ``shape`` on ``hardware`` at micro-batch ``size``."""
    boundaries = balance_counts(layer_parameters(shape), stages)
    rate = hardware.flops * hardware.rate_at(size) / slowdown
    seconds = lambda flops: tuple(value / rate for value in stage_sums(flops, boundaries))  # noqa: E731
    forward = seconds(layer_forward_flops(shape, size))
    element = hardware.activation_element_bytes
    by_mode = {
        mode: (
            seconds(layer_recompute_flops(shape, size, mode)),
            stage_sums(layer_activation_bytes(shape, size, element, mode), boundaries),
        )
        for mode in {"none", *recompute}
    }
    recompute_time = tuple(by_mode[mode][0][stage] for stage, mode in enumerate(recompute))
    full = by_mode["none"][1]
    stored = tuple(by_mode[mode][1][stage] for stage, mode in enumerate(recompute))
    weights = tuple(4.0 * count for count in stage_sums(layer_parameters(shape), boundaries))  # fp32 master weights
    if hardware.precision != "fp32":  # each forward under autocast saves its own 16-bit copy of the weights it used
        full = tuple(kept + weight / 2 for kept, weight in zip(full, weights))
        stored = tuple(
            kept + (weight / 2 if mode != "full" else 0.0) for kept, weight, mode in zip(stored, weights, recompute)
        )
    p2p_latency, p2p_bandwidth = hardware.link(ranks * data_parallel <= hardware.devices_per_node)
    _, data_bandwidth = hardware.link(data_parallel <= hardware.devices_per_node)
    cost = CostModel(
        forward_time=forward,
        backward_time=tuple(
            hardware.backward_ratio * (hardware.split_backward if split else 1.0) * time for time in forward
        ),
        recompute_time=recompute_time,
        optimizer_time=7 * max(weights) / optimizer_shards / hardware.memory_bandwidth,
        action_overhead=hardware.action_overhead,
        send_time=hardware.send_time,
        receive_time=hardware.receive_time,
        p2p_latency=p2p_latency,
        p2p_bandwidth=p2p_bandwidth,
        boundary_bytes=(boundary_bytes(shape, size, element),) * (stages - 1) + (0.0,),
        activation_bytes=full,
        weight_bytes=weights,
        data_parallel_latency=hardware.collective_latency,
        data_parallel_bandwidth=data_bandwidth,
    )
    return _Costs(cost, full, stored, weights)


def _costs_of(candidate: Candidate, shape: GPTShape, hardware: Hardware, slowdown: float = 1.0) -> _Costs:
    """Return the costs of ``candidate``, its compute ``slowdown`` times slower than each device alone (zero-bubble's
    backward, split in two, ``Hardware.split_backward`` times longer)."""
    config = candidate.schedule
    return _costs(
        shape,
        hardware,
        config.ranks,
        config.stages,
        config.data_parallel,
        candidate.microbatch_size,
        config.recompute_modes,
        config.data_parallel if config.zero else 1,
        slowdown,
        config.record.splits_backward,
    )


def ideal_time(candidate: Candidate, costs: _Costs, cores: int | None = None) -> float:
    """Return the busiest rank's compute time, or, when the processes share ``cores`` cores, the time those cores
    take for every process's compute if that is longer: no schedule of ``candidate`` runs a step faster."""
    config, cost = candidate.schedule, costs.cost
    per_stage = [
        config.microbatches
        * (f + b + (r if mode != "none" else 0.0) + (3 if mode != "none" else 2) * cost.action_overhead)
        for f, b, r, mode in zip(cost.forward_time, cost.backward_time, cost.recompute_time, config.recompute_modes)
    ]
    per_rank = [sum(per_stage[rank :: config.ranks]) for rank in range(config.ranks)]
    if cores is None:
        return max(per_rank)
    return max(max(per_rank), config.data_parallel * sum(per_rank) / cores)


def memory_floor(candidate: Candidate, costs: _Costs) -> float:
    """Return a lower bound of a device's memory: on each rank, its buffers at their least (the runtime's sharding
    rules, with nothing gathered and no gradient filled) and one micro-batch's stored activations of its largest
    stage; the most over the ranks."""
    config = candidate.schedule
    placement = make_placement(config)
    floors = []
    for rank in range(config.ranks):
        stages = placement.stages_of(rank)
        at_rest = tuple(Action(stage, Kind.F) for stage in stages)
        buffers = buffer_peak(at_rest, costs.weights, config.zero, config.data_parallel)
        floors.append(sum(buffers.values()) + max(costs.stored_activation[stage] for stage in stages))
    return max(floors)


def peak_memory(programs, config: ScheduleConfig, costs: _Costs) -> float:
    """Return the most bytes any rank of ``programs`` holds: buffers (the runtime's sharding rules) and activations."""
    recomputed = frozenset(config.recomputed_stages)
    peaks = []
    for program in programs:
        buffers = buffer_peak(program, costs.weights, config.zero, config.data_parallel)
        activations = activation_peak(program, costs.full_activation, costs.stored_activation, recomputed)
        peaks.append(sum(buffers.values()) + activations.bytes)
    return max(peaks, default=0.0)


def memory_programs(config: ScheduleConfig) -> tuple:
    """Return the programs ``peak_memory`` needs: compute, recomputes, gathers and steps, without the transfers and
    reduces (which hold no memory of their own), so that a candidate's memory is checked before it is lowered whole."""
    placement = make_placement(config)
    programs = compute_programs(config, placement)
    if config.zero == 3:
        programs = add_weight_gathers(programs, config.weight_buffers)
    programs = add_optimizer_steps(programs, config.zero, config.step_placement == "early")
    return add_recompute(programs, config.recomputed_stages) if config.recomputed_stages else programs


def evaluate(candidate: Candidate, shape: GPTShape, hardware: Hardware, memory_limit: float) -> PlanEntry | None:
    """Return the simulated entry of ``candidate``, or ``None`` when it does not fit in ``memory_limit`` bytes."""
    return measure(candidate, shape, hardware, memory_limit)[0]


def measure(
    candidate: Candidate, shape: GPTShape, hardware: Hardware, memory_limit: float
) -> tuple[PlanEntry | None, float]:
    """Return ``(entry, peak memory per device)``: the entry is ``None`` when the peak exceeds ``memory_limit``."""
    costs = _costs_of(candidate, shape, hardware)
    memory = peak_memory(memory_programs(candidate.schedule), candidate.schedule, costs)
    if memory > memory_limit:
        return None, memory
    result = _shared_cores_simulation(candidate, shape, hardware, costs)
    step_time = max(result.step_time, ideal_time(candidate, costs, hardware.cores))
    tokens = (
        candidate.schedule.microbatches
        * candidate.microbatch_size
        * candidate.schedule.data_parallel
        * shape.block_size
    )
    exposed = max((rank.exposed_communication for rank in result.ranks), default=0.0)
    bubble = 1 - (1 - result.bubble_fraction) * result.step_time / step_time  # against the step reported
    return PlanEntry(candidate, step_time, tokens / step_time, memory, bubble, exposed), memory


SHARING_ROUNDS = 3
"""Times the simulation is repeated to settle how much processes sharing cores slow each other."""


def _shared_cores_simulation(candidate: Candidate, shape: GPTShape, hardware: Hardware, costs: _Costs):
    """Return the simulation of ``candidate``; on a machine whose processes share cores, the compute slowed by
    ``Hardware.core_slowdown`` of the busy share the simulation itself finds (repeated ``SHARING_ROUNDS`` times,
    each with the slowdown the previous one implies)."""
    schedule = build_schedule(candidate.schedule, check=False)
    result = simulate(schedule, costs.cost)
    processes = candidate.schedule.ranks * candidate.schedule.data_parallel
    for _ in range(SHARING_ROUNDS if hardware.cores is not None else 0):
        busy = sum(rank.busy for rank in result.ranks) / (len(result.ranks) * result.step_time)
        slowdown = hardware.core_slowdown(processes, busy)
        if slowdown <= 1.0:
            break
        result = simulate(schedule, _costs_of(candidate, shape, hardware, slowdown).cost)
    return result


# ---------------------------------------------------------------- search
def plan(request: PlanRequest, progress: Callable[[int, int], None] | None = None) -> PlanResult:
    """Return the best ``request.top`` configurations for ``request``.

    ``progress(done, total)`` is called as each few candidates are looked
    at (for a progress bar).  The first entry is the one to use: the
    simplest of those within ``NEAR_TIE`` of the fastest; the others follow
    fastest first.
    Refuses, with ``ConfigError``: an unknown model, a bad cost file, and a
    request nothing fits (naming what would be needed).
    """
    shape, hardware = model_shape(request.model), hardware_of(request)
    limit = request.gpu_memory * GIB * USABLE_MEMORY
    ranked = _ranked(candidates(request, shape), shape, hardware)
    if not ranked:
        raise ConfigError("gpus", request.gpus, _no_layout_reason(request, shape))
    jobs = _jobs(request.jobs, ranked)
    with collector_paused():
        best, too_big, simulated, smallest = _search(ranked, request.top, shape, hardware, limit, progress, jobs)
    if not best:
        raise ConfigError("gpu_memory", request.gpu_memory, _too_big_reason(request, shape, smallest))
    return PlanResult(simplest_first(best)[: request.top], len(ranked), too_big, simulated, hardware, shape)


def best_among(
    chosen: Sequence[Candidate], shape: GPTShape, hardware: Hardware, memory_limit: float, top: int = 1, jobs: int = 0
) -> list[PlanEntry]:
    """Return the ``top`` fastest of ``chosen`` that fit in ``memory_limit`` bytes per device, fastest first
    (empty when none fits): the planner's search over candidates the caller picked, e.g. one family of
    schedules.  ``jobs``: processes that simulate side by side (0: one per core)."""
    ranked = _ranked(chosen, shape, hardware)
    with collector_paused():
        kept = _search(ranked, top, shape, hardware, memory_limit, None, _jobs(jobs, ranked))[0]
    return sorted(kept, key=lambda entry: entry.step_time)[:top]


def _ranked(chosen, shape: GPTShape, hardware: Hardware) -> list:
    """Return ``(ideal time, index, candidate)`` for each of ``chosen``, lowest ideal time first."""
    return sorted(
        ((ideal_time(c, _costs_of(c, shape, hardware), hardware.cores), index, c) for index, c in enumerate(chosen)),
        key=lambda item: item[:2],
    )


def _jobs(asked: int, ranked: list) -> int:
    """Return how many processes simulate side by side: ``asked`` (0: one per core), fewer for a short list."""
    return min(asked or len(os.sched_getaffinity(0)), max(1, len(ranked) // 8))


def _search(ranked, top: int, shape: GPTShape, hardware: Hardware, limit: float, progress, jobs: int) -> tuple:
    """Return the entries worth showing (the ``top`` fastest and every one within ``NEAR_TIE`` of the fastest,
    fastest first), the counts of candidates too big and simulated, and the least memory a candidate needs.

    Candidates go to ``jobs`` processes a few at a time, in order of their ideal time; the search stops when
    the next ideal time can beat none of the entries kept.
    """
    kept: list[PlanEntry] = []
    too_big = simulated = done = 0
    smallest = math.inf
    with _evaluator(jobs, shape, hardware, limit) as evaluate_all:
        while done < len(ranked) and ranked[done][0] < _horizon(kept, top):
            batch = [candidate for _, _, candidate in ranked[done : done + 4 * jobs]]
            done += len(batch)
            floors = [memory_floor(c, _costs_of(c, shape, hardware)) for c in batch]
            results = evaluate_all([c for c, floor in zip(batch, floors) if floor <= limit])
            smallest = min([smallest] + [f for f in floors if f > limit] + [m for e, m in results if e is None])
            entries = [entry for entry, _ in results if entry is not None]
            too_big += len(batch) - len(entries)
            simulated += len(entries)
            for entry in entries:
                if not any(_same(entry, other) for other in kept):
                    kept = _keep(kept + [entry], top)
            if progress:
                progress(done, len(ranked))
    return kept, too_big, simulated, smallest


def _horizon(kept: list[PlanEntry], top: int) -> float:
    """Return the ideal time from which no candidate can enter ``kept``."""
    if len(kept) < top:
        return math.inf
    return max(kept[top - 1].step_time, kept[0].step_time * (1 + NEAR_TIE))


def _keep(entries: list[PlanEntry], top: int) -> list[PlanEntry]:
    """Return the ``top`` fastest of ``entries`` and every other one within ``NEAR_TIE`` of the fastest."""
    ordered = sorted(entries, key=lambda entry: entry.step_time)
    window = ordered[0].step_time * (1 + NEAR_TIE)
    return [entry for index, entry in enumerate(ordered) if index < top or entry.step_time <= window]


@contextmanager
def _evaluator(jobs: int, shape: GPTShape, hardware: Hardware, limit: float):
    """Yield a function that measures a list of candidates, in this process or in ``jobs`` forked ones.

    Refuses, with ``ConfigError`` on ``jobs``, a pool whose process died (out of memory, killed).
    """
    if jobs <= 1:
        yield lambda batch: [measure(candidate, shape, hardware, limit) for candidate in batch]
        return
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_remember, initargs=(shape, hardware, limit))
    try:
        yield lambda batch: list(pool.map(_measure_remembered, batch))
    except BrokenProcessPool:
        raise ConfigError("jobs", jobs, "a simulation process died (out of memory?): try 1") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_REMEMBERED: tuple = ()


def _remember(shape: GPTShape, hardware: Hardware, limit: float) -> None:
    global _REMEMBERED
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to report, once
    _REMEMBERED = (shape, hardware, limit)


def _measure_remembered(candidate: Candidate) -> tuple[PlanEntry | None, float]:
    return measure(candidate, *_REMEMBERED)


def simplest_first(entries: list[PlanEntry]) -> tuple[PlanEntry, ...]:
    """Return ``entries`` (fastest first) with the simplest of those within ``NEAR_TIE`` of the fastest moved to the
    front: the lowest ZeRO level, then the fewest reduce portions, no recomputation, the fewest stages per rank."""
    if not entries:
        return ()
    near = [entry for entry in entries if entry.step_time <= entries[0].step_time * (1 + NEAR_TIE)]
    chosen = min(
        near,
        key=lambda entry: (
            entry.candidate.schedule.zero,
            entry.candidate.schedule.reduce_portions,
            entry.candidate.schedule.recompute != "none",
            entry.candidate.schedule.stages_per_rank,
            entry.step_time,
        ),
    )
    return (chosen,) + tuple(entry for entry in entries if entry is not chosen)


def _same(entry: PlanEntry, other: PlanEntry) -> bool:
    """Return whether two entries differ only in knobs that change nothing (the earlier, simpler one is kept)."""
    return math.isclose(entry.step_time, other.step_time, rel_tol=1e-9) and math.isclose(
        entry.memory, other.memory, rel_tol=1e-9
    )


def _no_layout_reason(request: PlanRequest, shape: GPTShape) -> str:
    return (
        f"no layout of {request.gpus} devices runs the model: pipeline ranks must divide the devices and be at "
        f"most its {shape.layers} layers, and the data-parallel replicas must divide `global_batch` "
        f"({request.global_batch})"
    )


def _too_big_reason(request: PlanRequest, shape: GPTShape, smallest: float) -> str:
    needed = smallest / USABLE_MEMORY / GIB
    return (
        f"no configuration of {describe_shape(shape)} on {request.gpus} devices fits: the smallest needs "
        f"{needed:.3g} GiB per device or more; use more `gpus` or devices with more memory"
    )


# ---------------------------------------------------------------- output
def describe_shape(shape: GPTShape) -> str:
    """Return the model in a few words, e.g. ``a 52.4-billion-parameter GPT (64 blocks of width 8192, 2048 tokens)``."""
    parameters = sum(layer_parameters(shape))
    size = f"{parameters / 1e9:.3g}-billion" if parameters >= 1e9 else f"{parameters / 1e6:.3g}-million"
    return f"a {size}-parameter GPT ({shape.blocks} blocks of width {shape.width}, {shape.block_size} tokens)"


def describe(entry: PlanEntry) -> str:
    """Return a configuration in a few words, e.g. ``breadth-first p=4 v=2 d=2 m=8 b=2 zero=3 recompute=none``."""
    config = entry.candidate.schedule
    words = [
        config.schedule,
        f"p={config.ranks}",
        f"v={config.stages_per_rank}",
        f"d={config.data_parallel}",
        f"m={config.microbatches}",
        f"b={entry.candidate.microbatch_size}",
    ]
    if config.group_size is not None:
        words.append(f"n={config.group_size}")
    if config.data_parallel > 1:
        words += [f"zero={config.zero}", f"portions={config.reduce_portions}"]
        if config.reduce_order != "priority":
            words.append(f"reduce={config.reduce_order}")
    words.append(f"recompute={config.recompute}")
    return " ".join(words)


def table(result: PlanResult) -> str:
    """Return the best entries as a text table: throughput, step time, memory per device, bubble, exposed comm."""
    lines = [
        f"{'#':>2}  {'tokens/s':>12}  {'step':>10}  {'memory/GPU':>10}  {'bubble':>7}  {'exposed comm':>12}  "
        f"configuration"
    ]
    for number_, entry in enumerate(result.best, 1):
        lines.append(
            f"{number_:>2}  {entry.tokens_per_second:>12.4g}  {_seconds(entry.step_time):>10}  "
            f"{entry.memory / GIB:>7.3g} GiB  {entry.bubble:>7.1%}  {_seconds(entry.exposed_communication):>12}  "
            f"{describe(entry)}"
        )
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{value * 1e3:.4g} ms" if value < 1 else f"{value:.4g} s"


def train_toml(entry: PlanEntry, result: PlanResult, request: PlanRequest) -> str:
    """Return ``entry`` as a ``layerpipe train --config`` file: the schedule's knobs, the batch, the model's sizes."""
    config, shape = entry.candidate.schedule, result.shape
    defaults = ScheduleConfig()
    keys = {
        name: value
        for name, value in config.to_json().items()
        if value is not None and (value != getattr(defaults, name) or name in ("schedule", "ranks", "microbatches"))
    }
    keys["batch_size"] = request.global_batch
    keys.update(block_size=shape.block_size, width=shape.width, heads=shape.heads, blocks=shape.blocks)
    if result.hardware.precision != "fp32":
        keys["precision"] = result.hardware.precision
    header = [
        f"# layerpipe plan: {request.gpus} devices of {request.gpu_memory:g} GiB on {result.hardware.name}, "
        f"global batch {request.global_batch}",
        f"# predicted: {entry.tokens_per_second:.4g} tokens/s, step {_seconds(entry.step_time)}, "
        f"{entry.memory / GIB:.3g} GiB per device, bubble {entry.bubble:.1%}",
        f"# model: vocabulary {shape.vocab_size} (layerpipe train takes it from its text)",
    ]
    return "\n".join(header + [f"{name} = {toml_value(value)}" for name, value in keys.items()]) + "\n"
