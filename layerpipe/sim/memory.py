"""The memory model: activations a rank holds, from the order of its program.

Compute on a rank runs in program order, so the activations alive after each
action follow from the program alone: a forward stores the stage's
activations for one micro-batch (only its input if the stage recomputes), a
recompute restores them, and the backward (``B``, or ``W`` when split) frees
them.  An overlapped pair stores its forward half's activations, then its
backward half frees its micro-batch's (the peak counts both at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ..schedule.actions import BACKWARD_KINDS, COMPUTE_KINDS, PAIR, Kind, Program, backward_end


class ActivationPeak(NamedTuple):
    """Peak micro-batch×stage activations alive at once, and the peak bytes they take."""

    count: int
    bytes: float


def activation_peak(
    program: Program,
    activation_bytes: Sequence[float],
    input_bytes: Sequence[float],
    recompute: frozenset[int] = frozenset(),
) -> ActivationPeak:
    """Return the peak number and bytes of stored activations over ``program``.

    ``activation_bytes[s]`` is what stage ``s`` stores per micro-batch,
    ``input_bytes[s]`` what a recomputed stage keeps instead (its input).
    Refuses nothing: actions other than F, R, B and W do not change memory.
    """
    count = peak_count = 0
    size = peak_size = 0.0
    freeing = backward_end(program)
    forward, recomputing, full = Kind.F, Kind.R, Kind.B
    for stage, kind, _, backward_stage, _ in program:
        if kind is forward:
            if stage in recompute:
                size += input_bytes[stage]
            else:
                count += 1
                size += activation_bytes[stage]
        elif kind is recomputing:
            count += 1
            size += activation_bytes[stage]
        elif kind is freeing or kind is full:  # a split program may hold full backwards too (dualpipe-v)
            count -= 1
            size -= activation_bytes[stage] + (input_bytes[stage] if stage in recompute else 0.0)
        elif kind is PAIR:  # the forward half stores, then the backward half frees
            stored, added = (input_bytes[stage], 0) if stage in recompute else (activation_bytes[stage], 1)
            peak_count, peak_size = max(peak_count, count + added), max(peak_size, size + stored)
            freed = activation_bytes[backward_stage] + (
                input_bytes[backward_stage] if backward_stage in recompute else 0.0
            )
            count, size = count + added - 1, size + stored - freed
            continue
        else:
            continue
        if count > peak_count:
            peak_count = count
        if size > peak_size:
            peak_size = size
    return ActivationPeak(peak_count, peak_size)


def buffer_peak(
    program: Program, weight_bytes: Sequence[float], zero: int, replicas: int, optimizer_states: int = 2
) -> dict[str, float]:
    """Return the peak bytes of parameter, gradient and optimizer-state buffers one rank holds over ``program``.

    ``weight_bytes[s]`` is stage ``s``'s parameters; the rank holds the
    stages its program computes.  The rules are the runtime's
    (``runtime/sharding.py``): below ZeRO-3 full parameters, at ZeRO-3 a
    shard (``1/replicas``) plus the stages gathered at once (``GATHER`` to
    ``RELEASE``); below ZeRO-2 full gradients, at ZeRO-2/3 a shard plus each
    stage's full gradient from its first backward to its ``STEP``; the
    optimizer keeps ``optimizer_states`` tensors the size of what it steps
    (AdamW: 2), full at ZeRO-0 and a shard above.  With one replica every
    level is ZeRO-0.
    """
    zero = zero if replicas > 1 else 0
    stages = sorted({action.stage for action in program if action.kind in COMPUTE_KINDS})
    full = sum(weight_bytes[s] for s in stages)
    shard = full / replicas
    parameters = gradients = full
    if zero == 3:
        parameters = _running_peak(program, weight_bytes, Kind.GATHER, Kind.RELEASE, shard)
    if zero >= 2:
        gradients = _running_peak(program, weight_bytes, None, Kind.STEP, shard)
    return {
        "parameters": parameters,
        "gradients": gradients,
        "optimizer": optimizer_states * (full if zero == 0 else shard),
    }


def _running_peak(
    program: Program, weight_bytes: Sequence[float], opening: Kind | None, closing: Kind, base: float
) -> float:
    """Return the peak of ``base`` plus the full stage buffers open at once (``opening``: first backward when ``None``)."""
    current = peak = base
    open_stages: set[int] = set()
    for action in program:
        opens = action.kind is opening if opening is not None else action.kind in BACKWARD_KINDS
        if opens and action.stage not in open_stages:
            open_stages.add(action.stage)
            current += weight_bytes[action.stage]
            peak = max(peak, current)
        elif action.kind is closing and action.stage in open_stages:
            open_stages.discard(action.stage)
            current -= weight_bytes[action.stage]
    return peak


def weight_versions(program: Program) -> dict[int, int]:
    """Return, per stage of the program, the most weight versions the rank must hold at once to stash them.

    Each ``STEP`` of a stage makes a new version; a forward uses the current
    one, and its backward (``W`` when split) needs that same version until it
    ends (PipeDream's weight stashing).  The count is the current version
    plus the older ones some sub-minibatch in flight still needs: 1 for
    every flushed schedule (its steps come after all its compute), more for
    the async stream when a stage updates while sub-minibatches are in flight.
    """
    stages = {action[0] for action in program if action[1] in COMPUTE_KINDS}
    last_compute = next((index for index in range(len(program) - 1, -1, -1) if program[index][1] in COMPUTE_KINDS), -1)
    if not any(action[1] is Kind.STEP for action in program[:last_compute]):
        return {stage: 1 for stage in stages}
    return _stashed_versions(program)


def _stashed_versions(program: Program) -> dict[int, int]:
    freeing = backward_end(program)
    current: dict[int, int] = {}
    forward_version: dict[tuple[int, int], int] = {}  # (stage, micro-batch) -> version its forward used
    in_flight: dict[int, dict[int, int]] = {}  # stage -> version -> sub-minibatches in flight that need it
    most: dict[int, int] = {}
    for stage, kind, microbatch, _, _ in program:
        counts = in_flight.setdefault(stage, {})
        if kind is Kind.F:
            version = current.get(stage, 0)
            forward_version[(stage, microbatch)] = version
            counts[version] = counts.get(version, 0) + 1
        elif kind is freeing:
            version = forward_version.pop((stage, microbatch))
            counts[version] -= 1
            if not counts[version]:
                del counts[version]
        elif kind is Kind.STEP:
            current[stage] = current.get(stage, 0) + 1
        else:
            continue
        alive = len(counts) + (current.get(stage, 0) not in counts)
        most[stage] = max(most.get(stage, 1), alive)
    return most
