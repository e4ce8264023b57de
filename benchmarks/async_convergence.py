"""Does pipelined backpropagation train as well as synchronous training? A study on the digits and on Shakespeare.

Run: python benchmarks/async_convergence.py [--seeds 3] [--epochs 5] [--tasks digits shakespeare]
Writes benchmarks/results/async_convergence.{json,md} and docs/async/convergence.png.

Two tasks on data that installed packages ship (nothing is downloaded):

* **digits** — eight residual blocks ``x + tanh(Wx + b)`` of width 64 and a
  10-class head learn scikit-learn's 8×8 digits (1,437 images to train, 360
  held out) for ``--epochs`` epochs; the measure is held-out accuracy;
* **shakespeare** — the demo's character-level GPT (width 64, 4 heads, 6
  blocks: 8 layers with the embedding and the head) on the plays of the
  ``shakespeare`` package, 95 % to train and the rest held out, for
  ``--text-updates`` updates; the measure is held-out cross-entropy.

Each model is cut into ``S`` equal stages, trained with SGD and momentum 0.9
on sub-minibatches of 8, and run by the single-process emulator
(``layerpipe.emulation.PipelinedBackprop``), which the multi-process runtime
equals bit for bit.  The model is the same for every ``S``, so only the
pipeline's delays differ.  Variants: ``synchronous`` forces every delay to
zero (synchronous training with gradient accumulation over ``k``, which
breadth-first computes); ``stashed`` and ``live`` stream with the real
delays, ``2(S-1-s)`` ticks at stage ``s``, under that weight policy;
``+ spike``, ``+ predict`` and ``+ spike+predict`` add Kosson et al.'s
delay corrections to stashed weights; ``double-buffered`` needs
``k >= 2(S-1)``, and ``synchronous, same k`` is synchronous training at that
``k``, the fair comparison for it.  Every configuration runs with the same
seeds; the tables give mean ± standard deviation over them.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import torch
from results_files import save_figure, write_results
from torch import nn

from layerpipe.emulation import PipelinedBackprop

HERE = os.path.dirname(os.path.abspath(__file__))
SUBMINIBATCH, WIDTH, BLOCKS, MOMENTUM = 8, 64, 8, 0.9

VARIANTS = {  # name: (weight policy, delay correction, delays forced to zero, k at least 2(S-1))
    "synchronous": ("stashed", "none", True, False),
    "stashed": ("stashed", "none", False, False),
    "live": ("live", "none", False, False),
    "stashed + spike": ("stashed", "spike", False, False),
    "stashed + predict": ("stashed", "predict", False, False),
    "stashed + spike+predict": ("stashed", "spike+predict", False, False),
    "double-buffered": ("double-buffered", "none", False, True),
    "synchronous, same k": ("stashed", "none", True, True),
}


@dataclass(frozen=True)
class Task:
    """A model, its data and its measure: what the study trains under every variant."""

    name: str
    metric: str  # the measure of a trained model, "higher" or "lower" is better
    better: str
    learning_rate: float
    stages_of: Callable  # (count, seed) -> list of stage modules
    stream: Callable  # (seed, every) -> (inputs, targets): the sub-minibatches of the whole run
    measure: Callable  # (stage modules) -> the metric on held-out data
    loss_fn: Callable = nn.functional.cross_entropy


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the digits as float inputs scaled to [0, 1] and labels: (train inputs, train labels, test inputs, test labels)."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing is downloaded

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    train, test = order[:1437], order[1437:]
    return inputs[train], labels[train], inputs[test], labels[test]


class Residual(nn.Module):
    """One block: ``x + tanh(Wx + b)``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


def stages_of(count: int, seed: int) -> list[nn.Module]:
    """Return the model (``BLOCKS`` residual blocks and a head, from ``seed``) cut into ``count`` equal stages."""
    torch.manual_seed(seed)
    blocks = [Residual() for _ in range(BLOCKS)]
    per = BLOCKS // count
    stages = [nn.Sequential(*blocks[index * per : (index + 1) * per]) for index in range(count)]
    stages[-1].append(nn.Linear(WIDTH, 10))
    return stages


def run_stages(modules: list[nn.Module], value):
    with torch.no_grad():
        for module in modules:
            value = module(value)
    return value


def digits_task(epochs: int) -> Task:
    """Return the digits task trained for ``epochs`` epochs."""
    train_inputs, train_labels, test_inputs, test_labels = digits()

    def stream(seed: int, every: int):
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = [], []
        for _ in range(epochs):
            order = torch.randperm(len(train_labels), generator=generator)
            usable = len(order) - len(order) % (SUBMINIBATCH * every)
            for batch in order[:usable].split(SUBMINIBATCH):
                inputs.append(train_inputs[batch])
                targets.append(train_labels[batch])
        return inputs, targets

    def measure(modules) -> float:
        return float((run_stages(modules, test_inputs).argmax(1) == test_labels).float().mean())

    return Task("digits", "held-out accuracy", "higher", 0.02, stages_of, stream, measure)


def shakespeare_task(updates: int) -> Task:
    """Return the character-level GPT on Shakespeare, trained on ``updates`` virtual minibatches of sub-minibatches."""
    from layerpipe.models.gpt import GPTConfig, gpt_layers, next_token_loss
    from layerpipe.models.text import CharacterText, load_corpus
    from layerpipe.train.tasks import split_text

    text = CharacterText.from_text(*load_corpus())
    training, held_out = split_text(text)
    config = GPTConfig(vocab_size=text.vocab_size, block_size=32, width=64, heads=4, blocks=6)
    evaluation = held_out.batch(256, config.block_size, torch.Generator().manual_seed(99))

    def text_stages(count: int, seed: int) -> list[nn.Module]:
        layers = gpt_layers(config, seed)
        per = len(layers) // count
        return [nn.Sequential(*layers[index * per : (index + 1) * per]) for index in range(count)]

    def stream(seed: int, every: int):
        generator = torch.Generator().manual_seed(seed)
        pairs = [training.batch(SUBMINIBATCH, config.block_size, generator) for _ in range(updates * every)]
        return [inputs for inputs, _ in pairs], [targets for _, targets in pairs]

    def measure(modules) -> float:
        return float(next_token_loss(run_stages(modules, evaluation[0]), evaluation[1]))

    return Task("shakespeare", "held-out loss", "lower", 0.1, text_stages, stream, measure, next_token_loss)


def one_run(task: Task, stages: int, variant: str, every: int, seed: int) -> dict:
    """Train one configuration; return its measure on held-out data and its mean training loss over the last tenth."""
    policy, correction, zero_delay, _ = VARIANTS[variant]
    modules = task.stages_of(stages, seed)
    pipe = PipelinedBackprop(
        modules,
        task.loss_fn,
        lambda params: torch.optim.SGD(params, lr=task.learning_rate, momentum=MOMENTUM),
        update_every=every,
        weight_policy=policy,
        zero_delay=zero_delay,
        delay_correction=correction,
    )
    inputs, targets = task.stream(seed, every)
    losses = pipe.train(inputs, targets)
    tail = losses[-max(1, len(losses) // 10) :]
    return {"measure": task.measure(modules), "loss": statistics.fmean(tail)}


def study(task: Task, seeds: int, stage_counts: list[int], every: int) -> list[dict]:
    """Return one row per (stages, variant): mean and standard deviation of the measure and loss over the seeds."""
    rows = []
    for stages in stage_counts:
        for variant, (_, _, _, needs_long_k) in VARIANTS.items():
            k = max(every, 2 * (stages - 1)) if needs_long_k else every
            runs = [one_run(task, stages, variant, k, seed) for seed in range(seeds)]
            rows.append(
                {
                    "task": task.name,
                    "stages": stages,
                    "variant": variant,
                    "update_every": k,
                    **{
                        f"{key}_{kind}": function([run[key] for run in runs])
                        for key in ("measure", "loss")
                        for kind, function in (("mean", statistics.fmean), ("std", _std))
                    },
                }
            )
            print(
                f"{task.name} S={stages} {variant:<24} k={k:<2} {task.metric} {rows[-1]['measure_mean']:.3f} "
                f"± {rows[-1]['measure_std']:.3f}",
                flush=True,
            )
    return rows


def _std(values: list[float]) -> float:
    """Return the standard deviation; NaN when a run diverged (a non-finite value)."""
    if any(not math.isfinite(value) for value in values):
        return float("nan")
    return statistics.stdev(values) if len(values) > 1 else 0.0


def plot(tasks: list[Task], rows: list[dict], path: str) -> None:
    """Draw each task's measure (mean ± std) against the number of stages, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes_list = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for axes, task in zip(axes_list[0], tasks):
        for variant in VARIANTS:
            mine = [row for row in rows if row["variant"] == variant and row["task"] == task.name]
            axes.errorbar(
                [row["stages"] for row in mine],
                [row["measure_mean"] for row in mine],
                yerr=[row["measure_std"] for row in mine],
                marker="o",
                capsize=3,
                label=variant,
            )
        axes.set_xlabel("pipeline stages S")
        axes.set_ylabel(f"{task.metric} ({task.better} is better)")
        axes.set_title(f"{task.name}: async against synchronous (SGD, momentum {MOMENTUM})")
        axes.set_xscale("log", base=2)
        axes.grid(alpha=0.3)
    axes_list[0][-1].legend(fontsize=8)
    save_figure(figure, path)


def table(task: Task, rows: list[dict]) -> list[str]:
    """Return the Markdown table of one task's rows."""
    lines = [
        f"## {task.name}",
        "",
        f"| stages | variant | update every | {task.metric} | training loss (last tenth) |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row["task"] == task.name:
            lines.append(
                f"| {row['stages']} | {row['variant']} | {row['update_every']} | "
                f"{row['measure_mean']:.3f} ± {row['measure_std']:.3f} | "
                f"{row['loss_mean']:.3f} ± {row['loss_std']:.3f} |"
            )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="digits: epochs")
    parser.add_argument("--text-updates", type=int, default=300, help="shakespeare: updates of every stage")
    parser.add_argument("--tasks", nargs="+", choices=("digits", "shakespeare"), default=["digits", "shakespeare"])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--update-every", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(HERE), "docs", "async", "convergence.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    makers = {"digits": lambda: digits_task(args.epochs), "shakespeare": lambda: shakespeare_task(args.text_updates)}
    tasks = [makers[name]() for name in args.tasks]
    rows = [row for task in tasks for row in study(task, args.seeds, args.stages, args.update_every)]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    report = {
        "date": date.today().isoformat(),
        "machine": machine,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "text_updates": args.text_updates,
        "subminibatch": SUBMINIBATCH,
        "momentum": MOMENTUM,
        "learning_rates": {task.name: task.learning_rate for task in tasks},
        "rows": rows,
    }
    lines = [
        f"# Pipelined backpropagation against synchronous training ({report['date']}, {machine})",
        "",
        f"SGD with momentum {MOMENTUM} (learning rate "
        + ", ".join(f"{task.learning_rate} on {task.name}" for task in tasks)
        + f"); sub-minibatches of {SUBMINIBATCH}; digits: {args.epochs} epochs; shakespeare: "
        f"{args.text_updates} updates; mean ± std over {args.seeds} seeds.",
        "",
    ]
    for task in tasks:
        lines += table(task, rows)
    plot(tasks, rows, args.plot)
    print(write_results(args.output, "async_convergence", report, lines))


if __name__ == "__main__":
    main()
