"""layerpipe beside the pipeline trainers a user would pick instead: same model, layout, batch and dtype, one run.

    python benchmarks/peers.py [--rounds 3] [--repeats 5] [--widths 512 1024] [--quick] [--no-venv-peers] [--v-shape]

Systems, on 2 processes (pipeline 2) unless said:

- layerpipe, every flushed schedule (gpipe, 1f1b, interleaved, breadth-first,
  grouped, zero-bubble, zb-v, dualpipe-v; async for reference: it never
  drains, so its step is not the same work);
- ``torch.distributed.pipelining``: ScheduleGPipe, Schedule1F1B,
  ScheduleInterleaved1F1B, ScheduleLoopedBFS, ScheduleInterleavedZeroBubble,
  ScheduleZBVZeroBubble and ScheduleDualPipeV (these two with torch's V
  placement: stages r and 2p-1-r on rank r);
- pipeline × data = 2 × 2 (4 processes): layerpipe breadth-first at ZeRO-3
  against ``torch.distributed.pipelining`` (ScheduleLoopedBFS) composed with
  FSDP2 (``fully_shard`` over the data-parallel mesh dimension, weights kept
  through the step, as torchtitan composes them), and DeepSpeed's
  ``PipelineModule`` at ZeRO-1 (the most it allows with pipelining);
- DeepSpeed ``PipelineModule``, Colossal-AI's 1F1B pipeline and torchgpipe,
  each in its own virtual environment under ``benchmarks/peers/envs/`` that
  this script builds on first use (``benchmarks/peers/envs.py``); the
  project never depends on them.

Models: 8 × [Linear(D, D) + Tanh] for each ``--widths`` D (MSE loss), and
the demo GPT (layerpipe and torch only; the peers' workers take the stack).
Every step is forward, backward and an SGD update (learning rate 0, so
every repetition does the same work on the same weights), float32, one
intra-op thread per process, m = 4 micro-batches (8 per replica at 2 × 2
for the GPT), global batch 16 (GPT: 32).

Every system's gradients are first checked against one float64
single-process reference.  Each system runs in its own launch (so peak
memory is its own); the launches are interleaved over ``--rounds`` rounds
(A B C A B C ...), each timing ``--repeats`` steps bracketed by barriers
after two warm-up steps; the table gives the median over all of them, the
ratio to the fastest peer, and the peak resident memory per process.
Results: ``benchmarks/results/peers.{json,md,csv}`` and ``peers.png``;
``--v-shape`` runs only the V schedules beside 1F1B and the zero-bubble
orders, on 2 processes, into ``peers_vshape.*``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from results_files import save_figure, write_results
from timing import time_steps_alternately
from torch import nn

import layerpipe
from layerpipe.models.gpt import GPTConfig, gpt_layers, next_token_loss
from layerpipe.runtime.partition import partition

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peers"))
import common  # noqa: E402  (benchmarks/peers/common.py: what every peer worker shares)
import model as stack_model  # noqa: E402  (benchmarks/peers/model.py: the stack, its batch and reference)

GPT = GPTConfig(vocab_size=80, block_size=64, width=128, heads=4, blocks=4)
LAYERPIPE_SCHEDULES = (
    ("gpipe", 1),
    ("1f1b", 1),
    ("interleaved", 2),
    ("breadth-first", 2),
    ("grouped", 2),
    ("zero-bubble", 2),
    ("zb-v", 2),
    ("dualpipe-v", 2),
    ("async", 1),
)
TORCH_SCHEDULES = (
    ("ScheduleGPipe", 1),
    ("Schedule1F1B", 1),
    ("ScheduleInterleaved1F1B", 2),
    ("ScheduleLoopedBFS", 2),
    ("ScheduleInterleavedZeroBubble", 2),
    ("ScheduleZBVZeroBubble", 2),
    ("ScheduleDualPipeV", 2),
)
TORCH_V_SHAPE = ("ScheduleZBVZeroBubble", "ScheduleDualPipeV")
"""torch's schedules that place stages in a V: rank r holds stages r and 2p-1-r (its ``generate_stage_to_rank_mapping``
with style "v"), not the looping r and r+p."""
V_SHAPE_ONLY = {"1f1b", "zero-bubble", "zb-v", "dualpipe-v", "Schedule1F1B", "ScheduleInterleavedZeroBubble"}
V_SHAPE_ONLY |= set(TORCH_V_SHAPE)
"""What ``--v-shape`` runs: the V schedules of both and the 1F1B and zero-bubble orders they improve on."""
TOLERANCE = 1e-5


# ---------------------------------------------------------------- the models
def model_parts(model: str):
    """Return ``(layers, loss, inputs, targets, samples)`` of ``model`` ("gpt" or "stack-D"), the same on every process."""
    if model == "gpt":
        generator = torch.Generator().manual_seed(1)
        inputs = torch.randint(0, GPT.vocab_size, (32, GPT.block_size), generator=generator)
        targets = torch.randint(0, GPT.vocab_size, (32, GPT.block_size), generator=generator)
        return gpt_layers(GPT), next_token_loss, inputs, targets, 32
    width = int(model.split("-")[1])
    inputs, targets = stack_model.make_batch(16, width)
    return stack_model.stack_layers(width), stack_model.loss_fn, inputs, targets, 16


def reference_gradients(model: str) -> dict[str, torch.Tensor]:
    """Return the float64 single-process gradients of the whole batch, keyed ``"{layer}.{name}"``."""
    layers, loss, inputs, targets, _ = model_parts(model)
    layers = [layer.double() for layer in layers]
    output = nn.Sequential(*layers)(inputs if model == "gpt" else inputs.double())
    loss(output, targets if model == "gpt" else targets.double()).backward()
    return {
        f"{index}.{name}": parameter.grad
        for index, layer in enumerate(layers)
        for name, parameter in layer.named_parameters()
    }


def worst_error(found: dict, reference: dict[str, torch.Tensor]) -> float:
    """Return the largest ``||g - reference|| / ||reference||`` over the gradients this process holds.

    ``found`` maps a key to a gradient, or to ``(flat slice, start)`` for a shard of it.
    """
    worst = 0.0
    for key, value in found.items():
        gradient, start = value if isinstance(value, tuple) else (value, 0)
        gradient = gradient.double().reshape(-1)
        expected = reference[key].reshape(-1)[start : start + gradient.numel()]
        if expected.numel():
            worst = max(worst, float((gradient - expected).norm() / reference[key].norm()))
    return worst


def _timed_steps(step, repeats: int) -> list[float]:
    return time_steps_alternately({"step": step}, repeats, warmups=2)["step"]


def _gathered(error: float, times: list[float]) -> dict | None:
    """Return, on process 0, the step times, the worst gradient error and every process's peak memory."""
    peaks = [None] * dist.get_world_size()
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, common.vm_hwm())
    dist.all_gather_object(errors, error)
    if dist.get_rank():
        return None
    return {"times": times, "gradient_error": max(errors), "peak_rss": peaks}


# ---------------------------------------------------------------- the workers (one launch each)
def layerpipe_worker(
    model: str, schedule: str, stages_per_rank: int, microbatches: int, data: int, zero: int, repeats: int
) -> dict | None:
    torch.set_num_threads(1)
    layers, loss, inputs, targets, _ = model_parts(model)
    options = dict(
        schedule=schedule,
        microbatches=microbatches,
        stages_per_rank=stages_per_rank,
        data_parallel=data,
        zero=zero,
        group_size=3 if schedule == "grouped" else None,
    )
    pipe = layerpipe.Pipeline(
        layers, loss, optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.0), timeout=300, **options
    )
    pipe.train_step(inputs, targets)
    found = {}
    for shard in pipe.shards.values():
        starts = {name: start for name, start, _ in shard.shard_ranges()}
        found.update({name: (gradient, starts[name] if zero >= 2 else 0) for name, gradient in shard.local_gradients()})
    error = float("nan") if schedule == "async" else worst_error(found, reference_gradients(model))
    return _gathered(error, _timed_steps(lambda: pipe.train_step(inputs, targets), repeats))


def _torch_pipeline(
    model: str,
    schedule_name: str,
    stages_per_rank: int,
    microbatches: int,
    rank: int,
    ranks: int,
    group=None,
    shard=None,
):
    """Return ``(schedule, stage modules, layers, loss, inputs, targets)`` of ``torch.distributed.pipelining``."""
    from torch.distributed import pipelining

    layers, loss, inputs, targets, _ = model_parts(model)
    stages = ranks * stages_per_rank
    boundaries = partition(layers, stages)
    indices = [rank + ranks * k for k in range(stages_per_rank)]
    if schedule_name in TORCH_V_SHAPE:
        indices = [rank, 2 * ranks - 1 - rank]
    modules = {index: nn.Sequential(*layers[boundaries[index][0] : boundaries[index][1]]) for index in indices}
    if shard is not None:
        for module in modules.values():
            shard(module)
    pipeline_stages = [
        pipelining.PipelineStage(modules[index], index, stages, torch.device("cpu"), group=group) for index in indices
    ]
    schedule_class = getattr(pipelining, schedule_name)
    schedule = schedule_class(
        pipeline_stages if stages_per_rank > 1 else pipeline_stages[0], microbatches, loss_fn=loss
    )
    return schedule, modules, layers, loss, inputs, targets


def _torch_step(schedule, modules, optimizer, first: bool, last: bool, inputs, targets):
    def step():
        optimizer.zero_grad(set_to_none=True)
        schedule.step(*((inputs,) if first else ()), **({"target": targets, "losses": []} if last else {}))
        optimizer.step()

    return step


def _keys(layers) -> dict[int, str]:
    return {
        id(parameter): f"{index}.{name}"
        for index, layer in enumerate(layers)
        for name, parameter in layer.named_parameters()
    }


def torch_worker(model: str, schedule_name: str, stages_per_rank: int, microbatches: int, repeats: int) -> dict | None:
    torch.set_num_threads(1)
    rank, ranks = dist.get_rank(), dist.get_world_size()
    schedule, modules, layers, _, inputs, targets = _torch_pipeline(
        model, schedule_name, stages_per_rank, microbatches, rank, ranks
    )
    parameters = [parameter for module in modules.values() for parameter in module.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.0)
    step = _torch_step(
        schedule, modules, optimizer, 0 in modules, ranks * stages_per_rank - 1 in modules, inputs, targets
    )
    step()
    keys = _keys(layers)
    error = worst_error({keys[id(p)]: p.grad for p in parameters}, reference_gradients(model))
    return _gathered(error, _timed_steps(step, repeats))


def fsdp_worker(model: str, microbatches: int, repeats: int) -> dict | None:
    """torch.distributed.pipelining's ScheduleLoopedBFS on 2 pipeline ranks, each stage fully sharded (FSDP2) over 2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pipeline", "data"))
    pipeline_rank, replica = mesh.get_local_rank("pipeline"), mesh.get_local_rank("data")
    schedule, modules, layers, _, inputs, targets = _torch_pipeline(
        model,
        "ScheduleLoopedBFS",
        2,
        microbatches,
        pipeline_rank,
        2,
        group=mesh["pipeline"].get_group(),
        shard=lambda module: fully_shard(module, mesh=mesh["data"], reshard_after_forward=False),
    )
    half = inputs.shape[0] // 2
    inputs, targets = inputs[replica * half : (replica + 1) * half], targets[replica * half : (replica + 1) * half]
    parameters = [parameter for module in modules.values() for parameter in module.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.0)
    step = _torch_step(schedule, modules, optimizer, 0 in modules, 3 in modules, inputs, targets)
    step()
    keys = _keys(layers)
    error = worst_error({keys[id(p)]: p.grad.full_tensor() for p in parameters}, reference_gradients(model))
    return _gathered(error, _timed_steps(step, repeats))


# ---------------------------------------------------------------- the run
TORCH_PAIR = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved": "ScheduleInterleaved1F1B",
    "breadth-first": "ScheduleLoopedBFS",
    "zero-bubble": "ScheduleInterleavedZeroBubble",
    "zb-v": "ScheduleZBVZeroBubble",
    "dualpipe-v": "ScheduleDualPipeV",
}


def systems(model: str, venv_peers: bool, only: set[str] | None = None) -> list[dict]:
    """Return every system to run on ``model``: name, schedule, layout and how to start it (with ``only``, the
    2-process ones whose schedule it names)."""
    m = 4
    found = [
        {
            "system": "layerpipe",
            "schedule": name,
            "layout": "2",
            "launch": (layerpipe_worker, 2, (model, name, v, m, 1, 0)),
        }
        for name, v in LAYERPIPE_SCHEDULES
    ]
    found += [
        {
            "system": "torch.distributed.pipelining",
            "schedule": name,
            "layout": "2",
            "launch": (torch_worker, 2, (model, name, v, m)),
        }
        for name, v in TORCH_SCHEDULES
    ]
    found += [
        {
            "system": "layerpipe",
            "schedule": "breadth-first, ZeRO-3",
            "layout": "2 x 2",
            "launch": (layerpipe_worker, 4, (model, "breadth-first", 2, m, 2, 3)),
        },
        {
            "system": "torch.distributed.pipelining + FSDP2",
            "schedule": "ScheduleLoopedBFS, fully_shard",
            "layout": "2 x 2",
            "launch": (fsdp_worker, 4, (model, m)),
        },
    ]
    if venv_peers and model != "gpt":
        width = model.split("-")[1]
        common = ["--width", width, "--microbatches", str(m), "--samples", "16"]
        found += [
            {
                "system": "DeepSpeed",
                "schedule": "PipelineModule (1F1B)",
                "layout": "2",
                "peer": ("deepspeed", common + ["--pipeline", "2"], 2),
            },
            {
                "system": "Colossal-AI",
                "schedule": "OneForwardOneBackwardSchedule",
                "layout": "2",
                "peer": ("colossalai", common + ["--pipeline", "2"], 2),
            },
            {
                "system": "torchgpipe",
                "schedule": "GPipe (one process, two CPU 'devices')",
                "layout": "2",
                "peer": ("torchgpipe", common + ["--pipeline", "2"], 1),
            },
            {
                "system": "DeepSpeed",
                "schedule": "PipelineModule, ZeRO-1",
                "layout": "2 x 2",
                "peer": ("deepspeed", common + ["--pipeline", "2", "--data", "2", "--zero", "1"], 4),
            },
        ]
    if only is not None:
        return [entry for entry in found if entry["schedule"] in only and entry["layout"] == "2"]
    return found


def run_once(entry: dict, repeats: int, scratch: str) -> dict | None:
    """Start one system for ``repeats`` timed steps; return its times, gradient error and peak memory (None: failed)."""
    if "peer" in entry:
        import envs

        name, arguments, processes = entry["peer"]
        output = os.path.join(scratch, f"{name}.json")
        result = envs.run_peer(name, arguments + ["--repeats", str(repeats)], processes, output, timeout=900)
        if result is None:
            return None
        return {
            "times": result["step_times"],
            "gradient_error": result["max_gradient_error"],
            "peak_rss": result["peak_vmhwm_bytes_per_process"],
        }
    function, processes, arguments = entry["launch"]
    return layerpipe.launch(function, processes, arguments + (repeats,), timeout=900, start_method="spawn")[0]


def run(
    models: list[str], rounds: int, repeats: int, venv_peers: bool, scratch: str, only: set[str] | None = None
) -> list[dict]:
    """Run every system of every model (or those ``only`` names) over ``rounds`` interleaved rounds; return one row
    per system."""
    rows = []
    for model in models:
        entries = systems(model, venv_peers, only)
        results: dict[int, list[dict]] = {index: [] for index in range(len(entries))}
        for round_ in range(rounds):
            for index, entry in enumerate(entries):
                print(
                    f"{model} round {round_ + 1}/{rounds}: {entry['system']} {entry['schedule']} ({entry['layout']})",
                    file=sys.stderr,
                    flush=True,
                )
                result = run_once(entry, repeats, scratch)
                if result is not None:
                    results[index].append(result)
        for index, entry in enumerate(entries):
            got = results[index]
            if not got:
                continue
            times = [time for result in got for time in result["times"]]
            rows.append(
                {
                    "model": model,
                    "system": entry["system"],
                    "schedule": entry["schedule"],
                    "layout": entry["layout"],
                    "median": statistics.median(times),
                    "times": times,
                    "gradient_error": got[0]["gradient_error"],
                    "peak_rss": max(max(result["peak_rss"]) for result in got),
                }
            )
    return rows


# ---------------------------------------------------------------- the limit no runtime can beat
LIMIT_SCHEDULE = {
    "gpipe": ("gpipe", 1),
    "1f1b": ("1f1b", 1),
    "interleaved": ("interleaved", 2),
    "breadth-first": ("breadth-first", 2),
    "grouped": ("grouped", 2),
    "zero-bubble": ("zero-bubble", 2),
    "ScheduleGPipe": ("gpipe", 1),
    "Schedule1F1B": ("1f1b", 1),
    "ScheduleInterleaved1F1B": ("interleaved", 2),
    "ScheduleLoopedBFS": ("breadth-first", 2),
    "ScheduleInterleavedZeroBubble": ("zero-bubble", 2),
    "zb-v": ("zb-v", 2),
    "dualpipe-v": ("dualpipe-v", 2),
    "ScheduleZBVZeroBubble": ("zb-v", 2),
    "ScheduleDualPipeV": ("dualpipe-v", 2),
}


@functools.cache
def stage_times(model: str, stages: int, microbatches: int, repeats: int = 21) -> tuple[tuple, tuple]:
    """Return each stage's median forward and backward time on one micro-batch, alone on one thread (after
    warm-up runs: the first ones allocate)."""
    torch.set_num_threads(1)
    layers, loss, inputs, targets, _ = model_parts(model)
    boundaries = partition(layers, stages)
    value = inputs[: inputs.shape[0] // microbatches]
    forward, backward = [], []
    for index, (start, end) in enumerate(boundaries):
        module = nn.Sequential(*layers[start:end])
        times_f, times_b = [], []
        for repeat in range(repeats + 3):
            given = value.detach().requires_grad_(value.is_floating_point())
            begin = time.perf_counter()
            output = module(given)
            middle = time.perf_counter()
            scalar = loss(output, targets[: output.shape[0]]) if index == stages - 1 else output.sum()
            scalar.backward()
            if repeat >= 3:
                times_f.append(middle - begin)
                times_b.append(time.perf_counter() - middle)
        forward.append(statistics.median(times_f))
        backward.append(statistics.median(times_b))
        with torch.no_grad():
            value = module(value)
    return tuple(forward), tuple(backward)


def bubble_limit(model: str, schedule: str, microbatches: int = 4, ranks: int = 2) -> float | None:
    """Return the step of ``schedule`` with each stage's measured compute and nothing else: no transfer, no
    overhead, no optimizer (the bubble-only limit)."""
    from layerpipe.schedule.build import build_schedule
    from layerpipe.schedule.config import ScheduleConfig
    from layerpipe.sim.cost import CostModel
    from layerpipe.sim.simulator import simulate

    if schedule not in LIMIT_SCHEDULE:
        return None
    name, stages_per_rank = LIMIT_SCHEDULE[schedule]
    forward, backward = stage_times(model, ranks * stages_per_rank, microbatches)
    config = ScheduleConfig(
        schedule=name,
        ranks=ranks,
        microbatches=microbatches,
        stages_per_rank=stages_per_rank,
        group_size=3 if name == "grouped" else None,
    )
    return simulate(
        build_schedule(config), CostModel(forward_time=tuple(forward), backward_time=tuple(backward))
    ).step_time


# ---------------------------------------------------------------- the report
def _ratios(rows: list[dict]) -> None:
    """Add to each row its ratio to the fastest peer of its model and layout, and to torch's matching schedule."""
    for row in rows:
        peers = [
            other["median"]
            for other in rows
            if other["model"] == row["model"] and other["layout"] == row["layout"] and other["system"] != "layerpipe"
        ]
        row["to_best_peer"] = row["median"] / min(peers) if peers else None
        pair = TORCH_PAIR.get(row["schedule"]) if row["system"] == "layerpipe" else None
        match = [other["median"] for other in rows if other["model"] == row["model"] and other["schedule"] == pair]
        row["to_torch_same_schedule"] = row["median"] / match[0] if match else None
        limit = bubble_limit(row["model"], row["schedule"]) if row["layout"] == "2" else None
        row["bubble_limit"] = limit
        row["to_limit"] = row["median"] / limit if limit else None


def _cell(value, form: str) -> str:
    return "-" if value is None or value != value else format(value, form)


def report(rows: list[dict], rounds: int, repeats: int) -> list[str]:
    today = datetime.date.today().isoformat()
    machine = (
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, gloo on "
        f"127.0.0.1, 1 thread per process"
    )
    lines = [
        f"# layerpipe beside its peers ({today})",
        "",
        f"Machine: {machine}. Each step: forward, backward and SGD update (learning rate 0), float32, 4 "
        f"micro-batches (per replica), global batch 16 (GPT: 32). Every system in its own launch; launches "
        f"interleaved over {rounds} rounds of {repeats} timed steps; medians. Gradient error: the largest "
        f"relative error against the float64 single-process reference, after the first step.",
        "",
    ]
    for model in dict.fromkeys(row["model"] for row in rows):
        lines += [
            f"## {model}",
            "",
            "| layout | system | schedule | step (ms) | / best peer | / torch, same schedule "
            "| bubble-only limit (ms) | / limit | gradient error | peak memory per process (MB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in sorted(
            (row for row in rows if row["model"] == model), key=lambda row: (row["layout"], row["median"])
        ):
            lines.append(
                f"| {row['layout']} | {row['system']} | {row['schedule']} | {1e3 * row['median']:.1f} | "
                f"{_cell(row['to_best_peer'], '.2f')} | {_cell(row['to_torch_same_schedule'], '.2f')} | "
                f"{_cell(row['bubble_limit'] and 1e3 * row['bubble_limit'], '.1f')} | {_cell(row['to_limit'], '.2f')} | "
                f"{_cell(row['gradient_error'], '.1e')} | {row['peak_rss'] / 1e6:.0f} |"
            )
        lines.append("")
    return lines


CSV_FIELDS = (
    "model",
    "layout",
    "system",
    "schedule",
    "median",
    "to_best_peer",
    "to_torch_same_schedule",
    "bubble_limit",
    "to_limit",
    "gradient_error",
    "peak_rss",
)


def write_csv(rows: list[dict], path: str) -> None:
    """Write one line per system: the table's figures in seconds, bytes and ratios."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def picture(rows: list[dict], path: str) -> None:
    """Draw each model's step times, one bar per system and schedule, layerpipe in its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(len(models), 1, figsize=(10, 3.2 * len(models)), squeeze=False)
    for axis, model in zip(axes[:, 0], models):
        chosen = sorted((row for row in rows if row["model"] == model), key=lambda row: (row["layout"], row["median"]))
        labels = [f"{row['layout']}: {row['system'].split(' ')[0]} {row['schedule'].split(',')[0]}" for row in chosen]
        colours = ["tab:blue" if row["system"] == "layerpipe" else "tab:gray" for row in chosen]
        axis.barh(range(len(chosen)), [1e3 * row["median"] for row in chosen], color=colours)
        axis.set_yticks(range(len(chosen)), labels, fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("median step (ms)")
        axis.set_title(f"{model} (blue: layerpipe)")
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--no-gpt", action="store_true", help="leave out the demo GPT")
    parser.add_argument("--no-venv-peers", action="store_true", help="leave out DeepSpeed, Colossal-AI and torchgpipe")
    parser.add_argument("--quick", action="store_true", help="one round, width 512 only")
    parser.add_argument(
        "--v-shape",
        action="store_true",
        help="only the V schedules (zb-v, dualpipe-v; torch's ScheduleZBVZeroBubble, ScheduleDualPipeV) beside 1F1B "
        "and zero-bubble, on 2 processes; results to peers_vshape.*",
    )
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    rounds, widths = (1, [512]) if args.quick else (args.rounds, args.widths)
    models = [f"stack-{width}" for width in widths] + ([] if args.no_gpt else ["gpt"])
    with tempfile.TemporaryDirectory(prefix="peers-") as scratch:
        rows = run(
            models, rounds, args.repeats, not args.no_venv_peers, scratch, V_SHAPE_ONLY if args.v_shape else None
        )
    name = "peers_vshape" if args.v_shape else "peers"
    _ratios(rows)
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "rounds": rounds,
        "repeats": args.repeats,
        "rows": rows,
    }
    picture(rows, os.path.join(args.output, f"{name}.png"))
    write_csv(rows, os.path.join(args.output, f"{name}.csv"))
    print(write_results(args.output, name, record, report(rows, rounds, args.repeats)))


if __name__ == "__main__":
    main()
