"""A candidate's memory per device: a lower bound before anything is built, and the peak of its programs."""

from __future__ import annotations

from ..schedule.actions import Action, Kind
from ..schedule.build import compute_programs, make_placement
from ..schedule.config import ScheduleConfig
from ..schedule.lowering import add_optimizer_steps, add_recompute, add_weight_gathers
from ..sim.memory import activation_peak, buffer_peak
from .candidates import Candidate
from .costs import Costs


def memory_floor(candidate: Candidate, costs: Costs) -> float:
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


def peak_memory(programs, config: ScheduleConfig, costs: Costs) -> float:
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
