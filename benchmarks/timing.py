"""Timing pipelines side by side: repetitions interleaved, each step bracketed by barriers."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch.distributed as dist


def time_steps_alternately(
    steps: dict[str, Callable[[], object]], repeats: int, warmups: int = 1, after: Callable[[str], None] | None = None
) -> dict[str, list[float]]:
    """Return each step's times over ``repeats`` rounds of A B C A B C ..., after ``warmups`` untimed rounds.

    Every step is bracketed by barriers over all processes, so a time is the
    slowest process's; ``after(name)`` runs after each timed step, outside
    the bracket.
    """
    for _ in range(warmups):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
            if after is not None:
                after(name)
    return times


def time_alternately(
    pipes: dict, repeats: int, inputs, targets, after: Callable[[str, object], None] | None = None
) -> dict[str, list[float]]:
    """Return each pipeline's step times over ``repeats`` rounds of A B C A B C ..., after one warm-up step each
    (shapes agreed, buffers allocated, an async stream filled); ``after(name, pipe)`` runs after each timed step."""
    steps = {name: functools.partial(pipe.train_step, inputs, targets) for name, pipe in pipes.items()}
    return time_steps_alternately(
        steps, repeats, after=None if after is None else lambda name: after(name, pipes[name])
    )
