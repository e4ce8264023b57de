"""What 2:4 sparsity costs the demo GPT: dense, 2:4 from scratch and 2:4 fine-tuned from dense, three seeds.

    python benchmarks/sparsity_accuracy.py [--steps 1000] [--seeds 0 1 2]

Every run is ``layerpipe train`` with the same small GPT (width 64, 2
blocks, 2 ranks, breadth-first) for the same number of steps S:

- dense: S dense steps;
- 2:4 scratch: S steps with ``--sparsity 2:4`` from the seed's initial weights;
- 2:4 SR-STE: the same with ``--sparsity-method sr-ste`` (the pattern may change);
- 2:4 fine-tuned: the dense run's checkpoint at step S/2, pruned by magnitude
  (``--init-from``), then S/2 steps with ``--sparsity 2:4`` on other batches
  (seed + 1000): S steps of training in all.

The table gives, per variant, the mean over seeds of the training loss
(mean of the last 20 steps) and of the held-out loss, with their spread.
Results go to ``benchmarks/results/sparsity_accuracy.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

from results_files import save_figure, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = [
    "--width",
    "64",
    "--heads",
    "4",
    "--blocks",
    "2",
    "--block-size",
    "64",
    "--batch-size",
    "16",
    "--microbatches",
    "4",
    "--sample-length",
    "0",
    "--learning-rate",
    "0.003",
]
VARIANTS = ("dense", "2:4 scratch", "2:4 SR-STE", "2:4 fine-tuned")


def train(output: str, steps: int, seed: int, *extra: str) -> dict:
    """Run ``layerpipe train`` once; return its summary."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerpipe.cli",
            "train",
            *MODEL,
            "--steps",
            str(steps),
            "--seed",
            str(seed),
            *extra,
            "--output",
            output,
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{output}: training failed\n{done.stderr[-2000:]}")
    with open(os.path.join(output, "summary.json")) as handle:
        return json.load(handle)


def one_seed(seed: int, steps: int, folder: str) -> dict[str, dict]:
    """Return the summaries of the four variants for ``seed``."""
    half = steps // 2
    dense = train(os.path.join(folder, f"dense-{seed}"), steps, seed, "--checkpoint-every", str(half), "--keep", "2")
    step_half = os.path.join(folder, f"dense-{seed}", "checkpoints", f"step-{half}")
    return {
        "dense": dense,
        "2:4 scratch": train(os.path.join(folder, f"scratch-{seed}"), steps, seed, "--sparsity", "2:4"),
        "2:4 SR-STE": train(
            os.path.join(folder, f"srste-{seed}"), steps, seed, "--sparsity", "2:4", "--sparsity-method", "sr-ste"
        ),
        "2:4 fine-tuned": train(
            os.path.join(folder, f"tuned-{seed}"),
            steps - half,
            seed + 1000,
            "--sparsity",
            "2:4",
            "--init-from",
            step_half,
        ),
    }


def tail_loss(summary: dict) -> float:
    return statistics.fmean(summary["losses"][-20:])


def spread(values: list[float]) -> float:
    """Return the sample standard deviation (0 for one value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def draw(runs: dict[int, dict[str, dict]], steps: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4))
    colours = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for seed, variants in runs.items():
        for variant, summary in variants.items():
            losses = summary["losses"]
            first = steps - len(losses)  # the fine-tuned run starts half-way
            axes.plot(
                range(first + 1, steps + 1),
                losses,
                linewidth=0.8,
                color=colours[variant],
                alpha=0.7,
                label=variant if seed == min(runs) else None,
            )
    axes.set_xlabel("step (the fine-tuned runs start from the dense run's step S/2)")
    axes.set_ylabel("training loss")
    axes.set_title("demo GPT, dense against 2:4 sparse (three seeds)")
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runs = {seed: one_seed(seed, args.steps, folder) for seed in args.seeds}
    draw(runs, args.steps, os.path.join(args.output, "sparsity_accuracy.png"))
    today = datetime.date.today().isoformat()
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)"
    lines = [
        f"# 2:4 sparsity and the demo GPT ({today})",
        "",
        f"Machine: {machine}. `layerpipe train {' '.join(MODEL)}`, {args.steps} steps in all per run, seeds "
        f"{', '.join(map(str, args.seeds))}; mean ± standard deviation over seeds.",
        "",
        "![loss curves](sparsity_accuracy.png)",
        "",
        "| variant | training loss (last 20 steps) | held-out loss | step time (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    record = {"date": today, "machine": machine, "steps": args.steps, "seeds": args.seeds, "variants": {}}
    for variant in VARIANTS:
        summaries = [runs[seed][variant] for seed in args.seeds]
        tails, held = [tail_loss(s) for s in summaries], [s["eval_loss"] for s in summaries]
        lines.append(
            f"| {variant} | {statistics.fmean(tails):.3f} ± {spread(tails):.3f} | "
            f"{statistics.fmean(held):.3f} ± {spread(held):.3f} | "
            f"{1e3 * statistics.fmean(s['step_time'] for s in summaries):.1f} |"
        )
        record["variants"][variant] = {
            "training_loss": tails,
            "held_out_loss": held,
            "losses": [s["losses"] for s in summaries],
        }
    print(write_results(args.output, "sparsity_accuracy", record, lines))


if __name__ == "__main__":
    main()
