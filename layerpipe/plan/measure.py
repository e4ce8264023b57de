"""One candidate measured: its memory checked, then its step simulated (on shared cores, slowed as they are)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schedule.build import build_schedule
from ..sim.gpt_costs import GPTShape
from ..sim.hardware import Hardware
from ..sim.simulator import simulate
from .candidates import Candidate
from .costs import Costs, costs_of, ideal_time
from .memory import memory_programs, peak_memory


@dataclass(frozen=True)
class PlanEntry:
    """A simulated configuration: its step time and throughput, memory per device, bubble and exposed communication."""

    candidate: Candidate
    step_time: float
    tokens_per_second: float
    memory: float
    bubble: float
    exposed_communication: float


def evaluate(candidate: Candidate, shape: GPTShape, hardware: Hardware, memory_limit: float) -> PlanEntry | None:
    """Return the simulated entry of ``candidate``, or ``None`` when it does not fit in ``memory_limit`` bytes."""
    return measure(candidate, shape, hardware, memory_limit)[0]


def measure(
    candidate: Candidate, shape: GPTShape, hardware: Hardware, memory_limit: float
) -> tuple[PlanEntry | None, float]:
    """Return ``(entry, peak memory per device)``: the entry is ``None`` when the peak exceeds ``memory_limit``."""
    costs = costs_of(candidate, shape, hardware)
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


def _shared_cores_simulation(candidate: Candidate, shape: GPTShape, hardware: Hardware, costs: Costs):
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
        result = simulate(schedule, costs_of(candidate, shape, hardware, slowdown).cost)
    return result
