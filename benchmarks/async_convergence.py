"""Does pipelined backpropagation train as well as synchronous training? A study on scikit-learn's digits.

Run: python benchmarks/async_convergence.py [--seeds 3] [--epochs 5]
Writes benchmarks/results/async_convergence.{json,md} and docs/async/convergence.png.

One model — eight residual blocks ``x + tanh(Wx + b)`` of width 64 and a
10-class head — learns the 8×8 digits that scikit-learn ships (1,797
images; 1,437 to train, 360 held out), split into ``S`` stages of ``8/S``
blocks, with SGD and momentum 0.9, sub-minibatches of 8 samples and an
update every ``k`` of them.  The model is the same for every ``S``, so
only the pipeline's delays differ.  Each run is the single-process emulator
(``layerpipe.emulation.PipelinedBackprop``), which runs the async
schedule's ticks exactly: ``synchronous`` forces every delay to zero (the
same updates as synchronous training with gradient accumulation over ``k``
sub-minibatches, which breadth-first computes), the others stream with the
real delays, ``2(S-1-s)`` ticks at stage ``s``, under each weight policy.
Every configuration runs with the same seeds; the table gives the held-out
accuracy and final training loss as mean ± standard deviation over them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from datetime import date

import torch
from torch import nn

from layerpipe.emulation import PipelinedBackprop

from results_files import save_figure, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
SUBMINIBATCH, WIDTH, BLOCKS, LEARNING_RATE, MOMENTUM = 8, 64, 8, 0.02, 0.9
VARIANTS = ("synchronous", "stashed", "live", "double-buffered")


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
    stages = [nn.Sequential(*blocks[index * per:(index + 1) * per]) for index in range(count)]
    stages[-1].append(nn.Linear(WIDTH, 10))
    return stages


def one_run(stages: int, variant: str, every: int, seed: int, epochs: int, data) -> dict:
    """Train one configuration; return its held-out accuracy and its mean training loss over the last epoch."""
    train_inputs, train_labels, test_inputs, test_labels = data
    modules = stages_of(stages, seed)
    policy = "stashed" if variant == "synchronous" else variant
    pipe = PipelinedBackprop(modules, nn.functional.cross_entropy,
                             lambda params: torch.optim.SGD(params, lr=LEARNING_RATE, momentum=MOMENTUM),
                             update_every=every, weight_policy=policy, zero_delay=variant == "synchronous")
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(train_labels), generator=generator)
        usable = len(order) - len(order) % (SUBMINIBATCH * every)
        batches = order[:usable].split(SUBMINIBATCH)
        losses = pipe.train([train_inputs[b] for b in batches], [train_labels[b] for b in batches])
    with torch.no_grad():
        value = test_inputs
        for module in modules:
            value = module(value)
        accuracy = float((value.argmax(1) == test_labels).float().mean())
    return {"accuracy": accuracy, "loss": statistics.fmean(losses)}


def study(seeds: int, epochs: int, stage_counts: list[int], every: int) -> list[dict]:
    """Return one row per (stages, variant): mean and standard deviation of accuracy and loss over the seeds."""
    data = digits()
    rows = []
    for stages in stage_counts:
        for variant in VARIANTS:
            k = max(every, 2 * (stages - 1)) if variant == "double-buffered" else every
            runs = [one_run(stages, variant, k, seed, epochs, data) for seed in range(seeds)]
            rows.append({"stages": stages, "variant": variant, "update_every": k,
                         **{f"{key}_{kind}": function([run[key] for run in runs])
                            for key in ("accuracy", "loss")
                            for kind, function in (("mean", statistics.fmean), ("std", _std))}})
            print(f"S={stages} {variant:<16} k={k:<2} accuracy {rows[-1]['accuracy_mean']:.3f} "
                  f"± {rows[-1]['accuracy_std']:.3f}", flush=True)
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def plot(rows: list[dict], path: str) -> None:
    """Draw held-out accuracy (mean ± std) against the number of stages, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for variant in VARIANTS:
        mine = [row for row in rows if row["variant"] == variant]
        axes.errorbar([row["stages"] for row in mine], [row["accuracy_mean"] for row in mine],
                      yerr=[row["accuracy_std"] for row in mine], marker="o", capsize=3, label=variant)
    axes.set_xlabel("pipeline stages S")
    axes.set_ylabel("held-out accuracy")
    axes.set_title("digits, 8 residual blocks, SGD momentum 0.9: async against synchronous")
    axes.set_xscale("log", base=2)
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--update-every", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(HERE), "docs", "async", "convergence.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = study(args.seeds, args.epochs, args.stages, args.update_every)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    report = {"date": date.today().isoformat(), "machine": machine, "seeds": args.seeds, "epochs": args.epochs,
              "subminibatch": SUBMINIBATCH, "learning_rate": LEARNING_RATE, "momentum": MOMENTUM, "rows": rows}
    lines = [f"# Pipelined backpropagation on the digits ({report['date']}, {machine})", "",
             f"{BLOCKS} residual blocks of width {WIDTH} cut into S stages; SGD lr {LEARNING_RATE}, momentum {MOMENTUM}; sub-minibatches "
             f"of {SUBMINIBATCH}; {args.epochs} epochs; mean ± std over {args.seeds} seeds.", "",
             "| stages | variant | update every | held-out accuracy | last-epoch training loss |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['stages']} | {row['variant']} | {row['update_every']} | "
                     f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | "
                     f"{row['loss_mean']:.3f} ± {row['loss_std']:.3f} |")
    plot(rows, args.plot)
    print(write_results(args.output, "async_convergence", report, lines))


if __name__ == "__main__":
    main()
