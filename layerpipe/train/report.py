"""What ``layerpipe train`` reports: one record of the run, written as summary.json, pictures and a trace.

``RunRecord`` holds everything the run produced; ``write_outputs`` writes
``summary.json``, ``loss.png``, ``timeline.png``, ``timeline.json`` (Chrome
trace) and ``timeline-data.json`` (the measured timeline in layerpipe's own
format, which ``layerpipe.sim.timeline.Timeline.from_json`` reads back), and
``print_summary`` the closing lines.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass
from statistics import median

from ..schedule.build import Schedule
from ..sim.timeline import Timeline
from .config import TrainConfig


@dataclass(frozen=True)
class Demo:
    """The trained demo, as the report names it: its model's sizes, its data and what a step processes."""

    model: dict
    corpus: str
    title: str
    unit: str
    items_per_step: int
    loss_label: str


def describe(task) -> Demo:
    """Return the report's description of a demo (one of ``tasks.TASKS``)."""
    return Demo(task.model.to_json(), task.corpus, task.title, task.unit, task.items_per_step, task.loss_label)


@dataclass(frozen=True)
class RunRecord:
    """Everything one training run produced, as rank 0 holds it at the end."""

    config: TrainConfig
    schedule: Schedule
    demo: Demo
    losses: tuple[float, ...]
    step_times: tuple[float, ...]
    learning_rates: tuple[float, ...]
    eval_loss: float
    measured: Timeline
    peak_memory: tuple[int, ...]
    outcome: object  # tasks.Outcome: the demo's own summary entries, files and closing lines
    wall_time: float
    memory: tuple[dict, ...]
    stream: dict | None = None  # async only: weight versions and measured staleness per stage
    grad_norms: tuple[float, ...] | None = None  # with --clip-grad-norm: each step's global norm before clipping


def stream_report(records_per_process: list, versions_per_process: list) -> dict | None:
    """Return, per stage, what the async stream did: the weight versions held and the staleness measured.

    ``records_per_process`` and ``versions_per_process`` are every
    process's ``Pipeline.version_records()`` and ``weight_versions()``;
    ``None`` when the run was not async (no records).  Per stage: the
    weight versions held at once, the ticks between a sub-minibatch's
    forward and backward as the ranks counted them (each distinct value
    seen), and how many updates a gradient's forward weights were behind
    the update that applied it (the largest and the mean).
    """
    records = [record for part in records_per_process for record in part]
    if not records:
        return None
    versions: dict[int, int] = {}
    for part in versions_per_process:
        for stage, count in part.items():
            versions[stage] = max(count, versions.get(stage, 0))
    stages = {}
    for stage in sorted({record.stage for record in records}):
        mine = [record for record in records if record.stage == stage]
        lags = [record.update_version - 1 - record.forward_version for record in mine]
        stages[str(stage)] = {
            "weight_versions": versions.get(stage, 1),
            "staleness_ticks": sorted({record.staleness for record in mine}),
            "updates_behind_max": max(lags),
            "updates_behind_mean": sum(lags) / len(lags),
            "sub_minibatches": len(mine),
        }
    return {
        "per_stage": stages,
        "kind": "per stage over the whole run (records of every data-parallel replica): "
        "weight versions held at once, ticks between forward and backward as "
        "counted by the rank, updates between a gradient's forward weights and "
        "the weights its update changed",
    }


def memory_report(pipe) -> dict:
    """Return this process's measured memory of the last step beside the simulator's memory model, in bytes.

    The model is fed the sizes measured here: what one forward of each stage
    saved (only its input when recomputed) and what one ``R`` added back.
    """
    from ..sim.memory import activation_peak, buffer_peak

    measured = pipe.memory()
    stages = pipe.schedule.placement.stages
    forward, regenerated = measured["forward_activations"], measured["recomputed_activations"]
    recomputed = frozenset(pipe.schedule.config.recomputed_stages)
    stored = [regenerated.get(s, 0) if s in recomputed else forward.get(s, 0) for s in range(stages)]
    kept = [forward.get(s, 0) for s in range(stages)]
    program = pipe.schedule.programs[pipe.rank]
    weights = [0.0] * stages
    for index, shard in pipe.shards.items():
        weights[index] = shard.weight_bytes
    predicted = buffer_peak(program, weights, pipe.schedule.config.zero, pipe.layout.data_parallel)
    predicted["activations"] = activation_peak(program, stored, kept, recomputed).bytes
    return {
        "process": pipe.global_rank,
        "pipeline_rank": pipe.rank,
        "replica": pipe.replica,
        "measured": {key: measured[key] for key in ("activations", "parameters", "gradients", "optimizer")},
        "predicted": predicted,
    }


def summary_of(record: RunRecord, simulated_step_time: float) -> dict:
    """Return the summary.json dictionary of a run."""
    steady = list(record.step_times[1:] or record.step_times)
    return {
        "config": record.config.to_json(),
        "model": record.demo.model,
        "corpus": record.demo.corpus,
        "losses": list(record.losses),
        "learning_rates": list(record.learning_rates),
        "first_loss": record.losses[0],
        "final_loss": record.losses[-1],
        "eval_loss": record.eval_loss,
        "step_time": median(steady),
        f"{record.demo.unit}_per_second": record.demo.items_per_step * len(steady) / sum(steady),
        "simulated_step_time": simulated_step_time,
        "measured_last_step_time": record.measured.step_time,
        "peak_memory_bytes": list(record.peak_memory),
        "peak_memory_kind": "peak resident set size of each rank's process (CPU) or CUDA allocator peak (GPU)",
        "memory": list(record.memory),
        "memory_kind": "per process, last step, bytes: saved activations (autograd saved-tensor hooks) and parameter, "
        "gradient and optimizer buffers, measured and as the simulator's memory model predicts",
        **record.outcome.summary,
        **({"stream": record.stream} if record.stream is not None else {}),
        **({"grad_norms": list(record.grad_norms)} if record.grad_norms is not None else {}),
        "wall_time": record.wall_time,
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.date.today().isoformat(),
    }


def simulated_step_time(schedule, cost) -> float:
    """Return the simulated time of one ``train_step``; for an async stream, what one more call adds in the steady state."""
    from ..schedule.build import build_schedule
    from ..sim.simulator import simulate

    if not schedule.config.streams:
        return simulate(schedule, cost).step_time
    calls = [simulate(build_schedule(schedule.config, check=False, calls=n), cost).step_time for n in (4, 5)]
    return calls[1] - calls[0]


def write_outputs(record: RunRecord) -> dict:
    """Write summary.json, loss.png, timeline.png, timeline.json and timeline-data.json; return the summary."""
    from ..sim.calibrate import calibrated_cost
    from ..sim.cost import at_means
    from ..viz.chrome_trace import write_chrome_trace
    from ..viz.gantt import plot_timeline

    output, schedule = record.config.output, record.config.pipeline
    cost = at_means(calibrated_cost(record.measured, record.schedule.placement.stages))
    summary = summary_of(record, simulated_step_time(record.schedule, cost))
    with open(os.path.join(output, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    record.measured.save(os.path.join(output, "timeline-data.json"))
    write_chrome_trace(record.measured, os.path.join(output, "timeline.json"))
    plot_timeline(
        record.measured,
        os.path.join(output, "timeline.png"),
        f"{schedule.schedule}: measured step, {schedule.ranks} ranks × {schedule.stages_per_rank} stages, "
        f"{schedule.microbatches} micro-batches",
    )
    plot_losses(record, os.path.join(output, "loss.png"))
    return summary


def plot_losses(record: RunRecord, path: str) -> None:
    """Draw the training loss of every step to ``path``; with clipping, the global gradient norm in a panel below.

    The norm panel shares the step axis and marks the clip limit; a step
    whose norm was not finite (skipped) leaves a gap.
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = record.grad_norms
    panels = 2 if norms else 1
    figure, axes = plt.subplots(panels, 1, figsize=(7, 3.5 + 2.2 * (panels - 1)), sharex=True, squeeze=False)
    loss_axes = axes[0][0]
    steps = range(1, len(record.losses) + 1)
    loss_axes.plot(steps, record.losses, linewidth=1)
    loss_axes.set_ylabel(record.demo.loss_label)
    loss_axes.set_title(f"{record.demo.title}, {record.config.pipeline.schedule}")
    if norms:
        norm_axes = axes[1][0]
        shown = [norm if math.isfinite(norm) else math.nan for norm in norms]
        norm_axes.plot(
            range(1, len(shown) + 1), shown, linewidth=1, color="tab:orange", label="global norm before clipping"
        )
        norm_axes.axhline(
            record.config.pipeline.clip_grad_norm, color="grey", linestyle="--", linewidth=1, label="clip limit"
        )
        norm_axes.set_ylabel("gradient norm")
        norm_axes.legend(loc="upper right", fontsize="small")
    for panel in axes[:, 0]:
        panel.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_summary(record: RunRecord, summary: dict) -> None:
    """Print the closing lines of a run: loss, speed, memory, what was written, and the sample."""
    first, final = summary["first_loss"], summary["final_loss"]
    print(
        f"\nloss {first:.3f} → {final:.3f} ({100 * (1 - final / first):.0f}% lower), "
        f"held-out loss {record.eval_loss:.3f}"
    )
    unit = record.demo.unit
    print(
        f"step time {1000 * summary['step_time']:.1f} ms measured, {1000 * summary['simulated_step_time']:.1f} ms "
        f"simulated from the measured action times; {summary[f'{unit}_per_second']:,.0f} {unit}/s"
    )
    own = record.memory[0]
    print(
        f"saved activations on process 0: {own['measured']['activations'] / 2**20:.2f} MiB at peak measured, "
        f"{own['predicted']['activations'] / 2**20:.2f} MiB by the memory model"
    )
    print(
        f"wrote {record.config.output}/: summary.json loss.png timeline.png timeline.json timeline-data.json "
        + "".join(f"{name} " for name in record.outcome.files)
        + f"checkpoints/step-{len(record.losses)}/"
    )
    if record.config.tensorboard is not None:
        print(
            f"wrote TensorBoard scalars to {record.config.tensorboard}/ (tensorboard --logdir {record.config.tensorboard})"
        )
    for line in record.outcome.lines:
        print(line)
