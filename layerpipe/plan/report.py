"""The planner's output: a configuration in a few words, the table of the best, and the train TOML file."""

from __future__ import annotations

from ..schedule.config import ScheduleConfig
from ..sim.cost_file import toml_value
from .measure import PlanEntry
from .request import GIB, PlanRequest
from .search import PlanResult


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
    if config.placement != "auto":
        words.append(f"placement={config.placement}")
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
