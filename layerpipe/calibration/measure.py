"""The measurement of ``layerpipe calibrate``, on every process: the demo's costs on this machine and layout.

``measure`` trains the configured steps (``command`` gives 20 unless
``--steps``) and up to 20 more without writing any output, and measures:

- from the measured timelines of the last steps (half of them, at most
  10), each stage's mean forward, backward and optimizer-step time, with
  the processes running together, their spread (processes sharing cores
  are descheduled at random, and the slowest replica or rank sets the
  pace), the runtime's overhead per action and what a send and a receive
  whose message is there cost their rank;
- the step the training loop runs at: the median time between twice as
  many more steps run back to back (the ``[about]`` table's
  ``measured_step``), which the simulator's steady step is set against;
- each stage's output bytes per micro-batch, the activation bytes one
  forward saved and its weight bytes;
- the latency and bandwidth of a message between processes 0 and 1, and of
  an all-reduce over every process (the latency the weight gathers of the
  run showed instead, when that is longer: processes sharing cores slow a
  collective down);
- how much slower a stage's forward runs while every process computes than
  alone, and the contention: how much longer the measured compute took
  than it would alone, were the cores shared fairly between the processes
  computing at each moment (the ``[about]`` table records both; the
  planner divides the compute times by the contention).

The cost file (TOML) feeds ``layerpipe simulate --cost-file``,
``compare --cost-file`` and ``plan --cost-file``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics

from ..sim.gpt_costs import SIZES


def _stage_bytes(pipe) -> dict:
    """Return, for this process's stages, their output bytes per micro-batch, saved activations and weights."""
    import torch

    metas = pipe.boundary_metas()
    saved = pipe.memory()["forward_activations"]
    sizes = {}
    for index, shard in pipe.shards.items():
        output = sum(
            torch.Size(meta.shape).numel() * torch.empty(0, dtype=meta.dtype).element_size() for meta in metas[index]
        )
        sizes[str(index)] = {"boundary": output, "weight": shard.weight_bytes, "activation": saved.get(index, 0)}
    return sizes


_CONTENTION_KIND = (
    "the measured compute time over the time it would take alone, were the cores shared fairly "
    "between the processes computing at each moment"
)


_ALONE_KIND = (
    "alone_forward: seconds of one forward of process 0's last stage, alone, at each of alone_sizes "
    "sequences per micro-batch; split_backward: a backward split into input and weight gradients over a "
    "whole one"
)


def _about(config, task, sharing: float, measured_step: float, measured: int) -> dict:
    """Return the cost file's ``[about]`` table: where, when and on what layout the figures were measured."""
    import torch.distributed as dist

    return {
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.date.today().isoformat(),
        "processes": dist.get_world_size(),
        "model": config.model,
        "schedule": config.pipeline.schedule,
        "ranks": config.pipeline.ranks,
        "stages_per_rank": config.pipeline.stages_per_rank,
        "microbatches": config.pipeline.microbatches,
        "data_parallel": config.pipeline.data_parallel,
        "zero": config.pipeline.zero,
        "batch_size": config.batch_size,
        "units": "seconds and bytes",
        "core_sharing": sharing,
        "core_sharing_kind": "a stage's forward while every process computes, divided by alone",
        "measured_step": measured_step,
        "measured_steps": measured,
        "cores": os.cpu_count() or 1,
        **_model_sizes(task),
    }


def _model_sizes(task) -> dict:
    """Return the GPT's sizes (the planner reads them to turn measured times into a compute rate); none for superres."""
    model = getattr(task, "model", None)
    if model is None or not hasattr(model, "vocab_size"):
        return {}
    return {key: getattr(model, key) for key in SIZES}


def _one_forward(pipe, first_microbatch):
    """Return a function that runs this process's first stage forward once, on an input of the agreed shape."""
    import torch

    index = min(pipe.stages)
    metas = pipe.boundary_metas()
    inputs = (
        first_microbatch
        if index == 0
        else tuple(torch.zeros(meta.shape, dtype=meta.dtype) for meta in metas[index - 1])
    )

    def run():
        with torch.no_grad():
            pipe.stages[index](*inputs)

    return run


def _inputs_of_size(pipe, index: int, first_microbatch: tuple, size: int) -> tuple:
    """Return inputs of stage ``index`` for a micro-batch of ``size`` sequences (the first micro-batch's tokens,
    repeated, for stage 0; zeros of the agreed shape for the others)."""
    import torch

    if index == 0:
        tokens = first_microbatch[0]
        return (tokens.repeat((size + len(tokens) - 1) // len(tokens), *[1] * (tokens.dim() - 1))[:size],)
    metas = pipe.boundary_metas()
    return tuple(torch.zeros((size, *meta.shape[1:]), dtype=meta.dtype) for meta in metas[index - 1])


def alone_figures(pipe, first_microbatch: tuple, largest: int) -> dict:
    """Return, measured on process 0 alone (collective): how much longer a split backward takes than a whole one,
    and the forward time of its last stage at micro-batches of 1, 2, 4, ... up to ``largest`` sequences (left out
    when that stage is the token stage of a model of several)."""
    import torch

    from .probes import alone, shared, split_backward_ratio

    index = max(pipe.stages)
    stage = pipe.stages[index]
    size = len(first_microbatch[0])
    ratio = split_backward_ratio(stage, _inputs_of_size(pipe, index, first_microbatch, size))
    # The token stage alone times an embedding lookup, which says nothing of the blocks' rate: process 0 decides.
    if not shared(float(index > 0 or pipe.schedule.placement.stages == 1)):
        return {"split_backward": ratio}
    sizes = [1 << power for power in range(max(1, largest).bit_length()) if 1 << power <= largest]
    times = []
    for size in sizes:
        inputs = _inputs_of_size(pipe, index, first_microbatch, size)

        def forward(inputs=inputs):
            with torch.no_grad():
                stage(*inputs)

        times.append(alone(forward))
    return {"alone_sizes": sizes, "alone_forward": times, "split_backward": ratio}


def steady_period(pipe, task, generator, steps: int) -> float:
    """Return the median time between the ends of ``steps + 1`` back-to-back training steps on this process.

    Nothing runs between them (the timelines were taken on earlier steps),
    so this is the step the training loop runs at, whatever the ranks'
    offsets at each step's start.
    """
    import time

    ends = []
    for _ in range(steps + 1):
        pipe.train_step(*task.batch(generator))
        ends.append(time.perf_counter())
    return statistics.median(later - earlier for earlier, later in zip(ends, ends[1:]))


def measured_steps(steps: int) -> int:
    """Return how many of the last steps are measured: half of them, at most 10 (the first ones warm up)."""
    return max(1, min(10, steps // 2))


def one_after_another(timelines: list):
    """Return one timeline holding the events of ``timelines``, each step placed after the one before."""
    from ..sim.timeline import Timeline, TimelineEvent

    events, offset = [], 0.0
    for part in timelines:
        events += [
            TimelineEvent(rank, stream, action, start + offset, end + offset)
            for rank, stream, action, start, end in part.events
        ]
        offset += part.step_time
    first = timelines[0]
    return Timeline(first.ranks, tuple(events), first.source, first.unit, first.title, first.metadata)


def _train(config, pipe, task, generator) -> tuple[list, float, tuple]:
    """Train ``config.steps`` steps; return the timelines of the last ``measured_steps``, the step the loop then runs
    at (``steady_period``) and the last batch."""
    timelines = []
    for step in range(config.steps):
        batch = task.batch(generator)
        pipe.train_step(*batch)
        if step >= config.steps - measured_steps(config.steps):
            timelines.append(pipe.timeline("calibration"))
    return timelines, steady_period(pipe, task, generator, 2 * measured_steps(config.steps)), batch


def _measured_cost(config, pipe, timeline, first: tuple) -> tuple:
    """Return the ``CostModel`` of ``timeline`` with the measured links, collectives and bytes put in, and the
    figures measured beside it (collective over every process)."""
    from ..runtime.exchange import all_gather_json
    from ..sim.calibrate import calibrated_cost, gather_latency
    from .probes import collective, core_sharing, point_to_point

    stages = pipe.schedule.placement.stages
    sizes = {int(stage): figures for part in all_gather_json(_stage_bytes(pipe)) for stage, figures in part.items()}
    latency, bandwidth = point_to_point()
    collective_latency, collective_bandwidth = collective()
    with pipe.weights_gathered("to time a forward alone"):
        sharing = core_sharing(_one_forward(pipe, first))
        alone_at = alone_figures(pipe, first, config.batch_size // config.pipeline.data_parallel)
    weights = tuple(float(sizes[s]["weight"]) for s in range(stages))
    loaded = gather_latency(timeline, weights, config.pipeline.data_parallel, collective_bandwidth)
    cost = dataclasses.replace(
        calibrated_cost(timeline, stages),
        p2p_latency=latency,
        p2p_bandwidth=bandwidth,
        boundary_bytes=tuple(float(sizes[s]["boundary"]) for s in range(stages)),
        activation_bytes=tuple(float(sizes[s]["activation"]) for s in range(stages)),
        weight_bytes=weights,
        data_parallel_latency=max(collective_latency, loaded or 0.0),
        data_parallel_bandwidth=collective_bandwidth,
    )
    return cost, {"idle_collective_latency": collective_latency, "core_sharing": sharing, "alone": alone_at}


def measure(config, cost_file: str) -> dict:
    """Train ``config.steps`` steps on this process, measure, and (on process 0) write ``cost_file``; return the
    figures on every process."""
    import torch
    import torch.distributed as dist

    from ..runtime.launch import init_process_group
    from ..sim.calibrate import contention
    from ..sim.cost_file import write_cost_file
    from ..sim.simulator import steady_step
    from ..train.loop import make_pipeline
    from ..train.tasks import task_for
    from .probes import set_timeout

    init_process_group(config.timeout)
    set_timeout(config.timeout)
    task = task_for(config)
    pipe = make_pipeline(config, task)
    timelines, measured_step, batch = _train(config, pipe, task, torch.Generator().manual_seed(config.seed))
    timeline = one_after_another(timelines)
    cost, beside = _measured_cost(config, pipe, timeline, (batch[0][: batch[0].shape[0] // pipe.microbatches],))
    alone_at = beside["alone"]
    figures = {
        "measured_step": measured_step,
        "simulated_step": steady_step(pipe.schedule.config, cost),
        "idle_collective_latency": beside["idle_collective_latency"],
        "core_sharing": beside["core_sharing"],
        "split_backward": alone_at["split_backward"],
        "contention": contention(timeline, os.cpu_count() or 1, config.pipeline.data_parallel),
        "cost": dataclasses.asdict(cost),
    }
    if dist.get_rank() == 0:
        about = _about(config, task, beside["core_sharing"], measured_step, len(timelines)) | {
            "contention": figures["contention"],
            "contention_kind": _CONTENTION_KIND,
            **alone_at,
            "alone_kind": _ALONE_KIND,
        }
        write_cost_file(cost_file, cost, about)
    return figures
