"""The training loop of ``layerpipe train``, small enough to hold in one's head.

``run(config)`` sets up the demo (``tasks.py``: its data and model) and the
``Pipeline``, trains for ``config.steps`` steps with the learning rate of
``get_lr(step)``, evaluates on held-out data, lets the demo show what it
learned (a text sample from the pipeline, or a picture),
saves a checkpoint and hands one ``RunRecord`` to the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint_files import checkpoints_of, find_checkpoint, prune_checkpoints
from ..runtime.checkpoint import (
    generator_state,
    kill_if_asked,
    load_checkpoint,
    restore_generator,
    restore_random_states,
    save_checkpoint,
)
from ..runtime.exchange import all_gather_json
from ..runtime.launch import init_process_group
from ..runtime.pipeline import Pipeline, peak_memory_bytes
from ..runtime.stream.versions import VersionRecord
from ..sim.timeline import Timeline
from .config import TrainConfig
from .folders import OUTPUT_FILES
from .metrics import NoMetrics, open_metrics, step_scalars
from .report import RunRecord, describe, memory_report, print_summary, stream_report, write_outputs
from .tasks import task_for

NO_METRICS = NoMetrics()
"""What ``train`` writes scalars to when no TensorBoard folder was asked for."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (the message says why, in one line)."""


def get_lr(step: int, config: TrainConfig) -> float:
    """Return the learning rate of ``step``: a linear warm-up over ``warmup_steps`` to ``learning_rate``, then cosine
    decay to a tenth of it by the last step (no warm-up: the decay starts at step 0).  ``config.warmup`` is
    ``warmup_steps``, or by default a quarter of the steps, at most 100."""
    warmup = config.warmup
    if step < warmup:
        return config.learning_rate * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, config.steps - 1 - warmup)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def steps_change(resumed: dict, config: TrainConfig) -> str | None:
    """Return the line a resume with a ``--steps`` other than the checkpoint's prints, or ``None`` when they agree.

    The new count wins: the learning rate's cosine spans it from the step
    resumed on (the steps already taken keep the rates they had).
    Checkpoints that do not record their count say nothing.
    """
    original, step = resumed.get("steps"), resumed["step"]
    if original is None or original == config.steps:
        return None
    if step >= config.steps:
        return f"resuming step {step} with --steps {config.steps}: no step is left to take"
    before, after = get_lr(step, dataclasses.replace(config, steps=original)), get_lr(step, config)
    return (
        f"resuming step {step} of {config.steps}, not of the checkpoint's {original}: the learning rate's cosine now "
        f"spans {config.steps} steps ({after:.3g} at step {step} instead of {before:.3g}); the steps taken keep theirs"
    )


def make_optimizer(config: TrainConfig):
    """Return ``callable(params) -> Optimizer`` for ``config.optimizer``: AdamW, or SGD with momentum 0.9."""
    if config.optimizer == "sgd":
        return lambda params: torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9)
    return lambda params: torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.01)


def make_pipeline(config: TrainConfig, task) -> Pipeline:
    """Return the demo's model split over this process's pipeline, with the configured optimizer on every local stage."""
    return Pipeline(
        task.layers(),
        task.loss_fn,
        config.pipeline,
        track_memory=True,
        timeout=config.timeout,
        optimizer=make_optimizer(config),
        precision=config.precision,
        broadcast_buffers=config.broadcast_buffers,
        spatial=config.spatial,
        **task.pipeline_options(),
    )


HISTORY = ("losses", "step_times", "learning_rates", "grad_norms")
"""The per-step lists of a run: kept in every checkpoint, written to summary.json and (the latest) to TensorBoard;
``grad_norms`` stays empty without clipping, which alone computes the global gradient norm."""


def resumed_history(resumed: dict | None, config: TrainConfig) -> dict[str, list]:
    """Return the per-step lists a run goes on from: empty, or a resumed checkpoint's.

    A checkpoint written before learning rates were kept gets them recomputed by ``get_lr``.
    """
    if resumed is None:
        return {name: [] for name in HISTORY}
    rates = resumed.get("learning_rates")
    if rates is None:
        taken = dataclasses.replace(config, steps=resumed.get("steps", config.steps))
        rates = [get_lr(step, taken) for step in range(resumed["step"])]
    return {
        "losses": list(resumed["losses"]),
        "step_times": list(resumed["step_times"]),
        "learning_rates": list(rates),
        "grad_norms": list(resumed.get("grad_norms", [])),
    }


def set_learning_rate(pipe: Pipeline, rate: float) -> None:
    """Give every local optimizer's parameter groups the learning rate ``rate``."""
    for optimizer in pipe.optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = rate


def train(
    pipe: Pipeline, task, config: TrainConfig, show: bool, resumed: dict | None = None, metrics=NO_METRICS
) -> dict[str, list]:
    """Run the training steps (from a resumed checkpoint's step on); return the per-step lists (``HISTORY``).

    Writes every step's scalars to ``metrics`` and a checkpoint every ``config.checkpoint_every`` steps and at the end.
    """
    generator = torch.Generator().manual_seed(config.seed)
    history, first, skips = resumed_history(resumed, config), 0, 0
    if resumed is not None:
        restore_generator(generator, resumed["data"])
        first = resumed["step"]
    bar = tqdm(total=config.steps, initial=first, desc="train", unit="step", disable=not show, dynamic_ncols=True)
    for step in range(first, config.steps):
        kill_if_asked("step", step)
        history["learning_rates"].append(get_lr(step, config))
        set_learning_rate(pipe, history["learning_rates"][-1])
        inputs, targets = task.batch(generator)
        started = time.perf_counter()
        history["losses"].append(pipe.train_step(inputs, targets))
        history["step_times"].append(time.perf_counter() - started)
        if pipe.last_grad_norm is not None:
            history["grad_norms"].append(pipe.last_grad_norm)
        skips = skips + 1 if pipe.last_step_skipped is not None else 0
        if skips >= config.max_skips:
            raise TrainingStopped(
                f"step {step}: {skips} steps in a row skipped, stage {pipe.last_step_skipped}'s "
                f"gradients were not finite: lower --learning-rate or look at the data"
            )
        done, scalars = step + 1, step_scalars(history, task.items_per_step, task.unit)
        metrics.write(done, scalars)
        bar.update(1)
        bar.set_postfix(
            {
                "loss": f"{scalars['train/loss']:.3f}",
                f"{task.unit}_per_s": f"{scalars[f'train/{task.unit}_per_second']:,.0f}",
            }
        )
        if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
            metrics.flush()  # the curves up to the checkpoint are on disk before it is
            write_checkpoint(
                pipe, config, {"step": done, "steps": config.steps, **history, "data": generator_state(generator)}
            )
    bar.close()
    return history


def write_checkpoint(pipe: Pipeline, config: TrainConfig, training: dict) -> str:
    """Write ``OUTPUT/checkpoints/step-N`` (collective) and keep only the latest ``config.keep``; return its folder."""
    folder = checkpoints_of(config.output)
    written = save_checkpoint(pipe, os.path.join(folder, f"step-{training['step']}"), training)
    if dist.get_rank() == 0:
        prune_checkpoints(folder, config.keep)
    return written


def clear_outputs(output: str) -> None:
    """Remove what an earlier run wrote into ``output`` (its files and checkpoints), so no stale file stays beside the new ones.

    Only the names a run writes are touched; anything else in the folder stays.
    """
    for name in OUTPUT_FILES:
        path = os.path.join(output, name)
        if os.path.isfile(path):
            os.remove(path)
    for name in ("checkpoints", "checkpoint"):  # "checkpoint": where earlier versions wrote theirs
        shutil.rmtree(os.path.join(output, name), ignore_errors=True)


def resume_state(pipe: Pipeline, config: TrainConfig) -> dict | None:
    """Load the checkpoint ``config.resume`` names into ``pipe`` and restore the random states; return its training state."""
    if config.resume is None:
        return None
    resumed = load_checkpoint(pipe, find_checkpoint(config.resume))
    restore_random_states(resumed["random"])
    return resumed


def _gathered(value) -> list:
    """Return every process's ``value`` (JSON in tensors, not pickles)."""
    return all_gather_json(value)


def train_and_evaluate(pipe: Pipeline, task, config: TrainConfig, resumed: dict | None) -> tuple[dict, float, Timeline]:
    """Train, then measure the last step's timeline and the held-out loss; return the per-step lists, the held-out
    loss and the timeline.  Rank 0 writes the scalars to ``config.tensorboard`` when it is given."""
    rank, first = dist.get_rank(), 0 if resumed is None else resumed["step"]
    metrics = open_metrics(config.tensorboard, first + 1, writes=rank == 0)
    try:
        history = train(pipe, task, config, show=rank == 0, resumed=resumed, metrics=metrics)
        measured = pipe.timeline(f"{config.pipeline.schedule}, measured last step")
        eval_loss = task.evaluate(pipe)  # async: flushes the stream first
        metrics.write(len(history["losses"]), {"eval/loss": eval_loss})
    finally:
        metrics.close()
    return history, eval_loss, measured


def run(config: TrainConfig) -> dict | None:
    """Train on this process's rank (a process group exists or is made from the environment).

    Returns the summary on the rank that writes it (rank 0), ``None`` on the others.
    """
    init_process_group(config.timeout)
    rank, started = dist.get_rank(), time.perf_counter()
    task = task_for(config)
    pipe = make_pipeline(config, task)
    if rank == 0:
        print(pipe.layout.describe())
    if config.resume is None and rank == 0:
        clear_outputs(config.output)
    resumed = resume_state(pipe, config)
    change = None if resumed is None else steps_change(resumed, config)
    if change is not None and rank == 0:
        print(change)
    history, eval_loss, measured = train_and_evaluate(pipe, task, config, resumed)
    records = [
        [VersionRecord(*fields) for fields in part]
        for part in _gathered([dataclasses.astuple(record) for record in pipe.version_records()])
    ]
    versions = [{int(stage): count for stage, count in part.items()} for part in _gathered(pipe.weight_versions())]
    stream = stream_report(records, versions)
    outcome = task.finish(pipe)
    os.makedirs(config.output, exist_ok=True)
    peaks, memory = _gathered(peak_memory_bytes(pipe.device)), _gathered(memory_report(pipe))
    if rank != 0:
        return None
    record = RunRecord(
        config,
        pipe.schedule,
        describe(task),
        tuple(history["losses"]),
        tuple(history["step_times"]),
        tuple(history["learning_rates"]),
        eval_loss,
        measured,
        tuple(peaks),
        outcome,
        time.perf_counter() - started,
        tuple(memory),
        stream,
        tuple(history["grad_norms"]) if config.pipeline.clip_grad_norm is not None else None,
    )
    summary = write_outputs(record)
    print_summary(record, summary)
    return summary
