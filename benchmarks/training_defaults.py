"""The loss curves that chose ``layerpipe train``'s defaults: warm-up and gradient clipping, on and off, 3 seeds.

    python benchmarks/training_defaults.py [--seeds 3] [--horizons 20 100 300] [--jobs 2]

Trains the demo GPT exactly as ``layerpipe train`` does at its default
settings (width 128, 4 blocks, 64 characters, 32 sequences a step, AdamW at
3e-3 with betas 0.9/0.99 and weight decay 0.01, cosine decay to a tenth),
with the same weights and batches for a seed, under four variants: no
warm-up and no clipping (the defaults before this study), warm-up only,
clipping only, and both.  Three horizons (``--horizons``): 20 steps, the
``layerpipe train --steps 20`` of issue 24 (whose loss jumped from 3.26 to
6.88 at step 9), 100, and 300 steps (the default run is 1000 steps; 300,
which a machine of two shared cores trains 12 times in reasonable time,
holds the early steps where runs spike and most of the descent: ``--horizons 20 100 1000`` runs the full one).  Warm-up lasts
``min(100, steps // 4)`` steps (a quarter of a short run: a tenth, 2 steps of
20, still let the loss rise above its start) and clipping limits the global
gradient norm to 1.0.

The runs are in one process (``nn.Sequential`` of the pipeline's layers,
``torch.nn.utils.clip_grad_norm_``): a pipeline computes the same
mathematics, and the script checks it by running ``layerpipe train --steps
N`` once (2 ranks, breadth-first, 8 micro-batches, warm-up and clipping
given explicitly) and reporting the largest difference of its losses from
the in-process curve.

The rule that picks the defaults: a variant is safe when no seed's
training loss, at any horizon, ever rises above its first step's loss
(the loss of the untrained model); among the safe variants the lowest mean
held-out loss at the end of the longest horizon wins.  Results:
``benchmarks/results/training_defaults.{json,md,png}``.
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
from concurrent.futures import ProcessPoolExecutor

from results_files import save_figure, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP = 1.0
VARIANTS = {  # name: (warm-up on, clipping on)
    "none": (False, False),
    "warm-up": (True, False),
    "clipping": (False, True),
    "warm-up + clipping": (True, True),
}


def warmup_for(steps: int) -> int:
    """Return the warm-up the study gives a run of ``steps`` steps: a quarter of it, at most 100."""
    return min(100, steps // 4)


def one_run(seed: int, steps: int, variant: str) -> dict:
    """Train the default GPT in one process for ``steps`` steps under ``variant``; return its curves and held-out loss."""
    import torch
    from torch import nn

    from layerpipe.train.config import TrainConfig, replaced
    from layerpipe.train.loop import get_lr, make_optimizer
    from layerpipe.train.tasks import GPTTask

    torch.set_num_threads(1)
    warm, clip = VARIANTS[variant]
    config = replaced(
        TrainConfig(), seed=seed, steps=steps, warmup_steps=warmup_for(steps) if warm else 0,
        clip_grad_norm=CLIP if clip else None,
    )  # fmt: skip
    task = GPTTask(config)
    model = nn.Sequential(*task.layers())
    optimizer = make_optimizer(config)(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    losses, norms = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, config)
        inputs, targets = task.batch(generator)
        loss = task.loss_fn(model(inputs), targets)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP if clip else float("inf"))))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        held = task.held_out.batch(config.batch_size, config.gpt.block_size, torch.Generator().manual_seed(seed + 1))
        eval_loss = task.loss_fn(model(held[0]), held[1]).item()
    return {
        "seed": seed,
        "steps": steps,
        "variant": variant,
        "losses": losses,
        "grad_norms": norms,
        "eval_loss": eval_loss,
    }


def largest_rise(losses: list[float]) -> float:
    """Return how far the loss ever rises above its first value (negative: it never reaches it again)."""
    return max(losses[1:]) - losses[0]


def pipeline_check(steps: int) -> dict:
    """Run ``layerpipe train`` (2 ranks, warm-up and clipping given) for ``steps`` steps at seed 0; return the largest
    difference of its losses from the in-process run's."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "layerpipe.cli", "train", "--steps", str(steps), "--seed", "0"]
        command += ["--warmup-steps", str(warmup_for(steps)), "--clip-grad-norm", str(CLIP)]
        command += ["--sample-length", "0", "--output", folder]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"layerpipe train failed\n{done.stderr[-2000:]}")
        with open(os.path.join(folder, "summary.json")) as handle:
            summary = json.load(handle)
    reference = one_run(0, steps, "warm-up + clipping")
    difference = max(abs(a - b) for a, b in zip(summary["losses"], reference["losses"]))
    return {"command": " ".join(["layerpipe", *command[3:-2]]), "steps": steps, "largest_loss_difference": difference}


def summarise(runs: list[dict], horizons: list[int]) -> dict:
    """Return, per horizon and variant: mean final training loss, mean held-out loss, the largest rise over seeds."""
    table = {}
    for steps in horizons:
        for variant in VARIANTS:
            mine = [run for run in runs if run["steps"] == steps and run["variant"] == variant]
            table[f"{steps}/{variant}"] = {
                "steps": steps,
                "variant": variant,
                "final_loss": statistics.mean(statistics.mean(run["losses"][-10:]) for run in mine),
                "eval_loss": statistics.mean(run["eval_loss"] for run in mine),
                "eval_loss_std": statistics.pstdev(run["eval_loss"] for run in mine),
                "largest_rise": max(largest_rise(run["losses"]) for run in mine),
            }
    return table


def choose(table: dict, horizons: list[int]) -> str:
    """Return the variant the rule picks: safe at every horizon (no rise above the first loss), then the lowest mean
    held-out loss of the longest horizon."""
    safe = [v for v in VARIANTS if all(table[f"{steps}/{v}"]["largest_rise"] <= 0 for steps in horizons)]
    return min(safe or VARIANTS, key=lambda v: table[f"{max(horizons)}/{v}"]["eval_loss"])


def plot(runs: list[dict], horizons: list[int], path: str) -> None:
    """Draw one panel per horizon and variant (rows: horizons), every seed's training loss in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(horizons), len(VARIANTS), figsize=(3.2 * len(VARIANTS), 2.8 * len(horizons)))
    for row, steps in enumerate(horizons):
        for column, variant in enumerate(VARIANTS):
            axis = axes[row][column]
            for run in (r for r in runs if r["steps"] == steps and r["variant"] == variant):
                axis.plot(range(1, steps + 1), run["losses"], linewidth=0.8, label=f"seed {run['seed']}")
            axis.axhline(axis.lines[0].get_ydata()[0], color="grey", linestyle=":", linewidth=0.8)
            axis.set_title(f"{variant}, {steps} steps", fontsize=9)
            axis.set_ylim(1.0 if steps > 100 else 2.5, 7.5)
            axis.grid(alpha=0.3)
            axis.set_xlabel("step", fontsize=8)
        axes[row][0].set_ylabel("training loss", fontsize=8)
    axes[0][0].legend(fontsize=7)
    save_figure(figure, path)


def markdown(record: dict) -> list[str]:
    """Return the results as Markdown: how they were made, the figure, the table and the choice."""
    lines = [
        f"# Warm-up and clipping: the loss curves that chose the defaults ({record['date']})",
        "",
        f"Machine: {record['machine']}. Demo GPT at `layerpipe train`'s default settings, seeds "
        f"{', '.join(map(str, record['seeds']))}; warm-up `min(100, steps // 4)` steps, clipping at a global norm "
        f"of {CLIP}. In one process; `{record['check']['command']}` differs from the in-process curve by at most "
        f"{record['check']['largest_loss_difference']:.1e} in loss over its {record['check']['steps']} steps.",
        "",
        "![loss curves](training_defaults.png)",
        "",
        "| steps | variant | largest rise above the first loss (worst seed) | final training loss | held-out loss |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for row in record["table"].values():
        lines.append(
            f"| {row['steps']} | {row['variant']} | {row['largest_rise']:+.2f} | {row['final_loss']:.3f} | "
            f"{row['eval_loss']:.3f} ± {row['eval_loss_std']:.3f} |"
        )
    lines += [
        "",
        f"Chosen by the rule (no rise above the first loss, then lowest held-out loss): **{record['chosen']}**.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--horizons", type=int, nargs="+", default=[20, 100, 300], help="steps of the runs compared")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    horizons = sorted(args.horizons)
    jobs = [
        (seed, steps, variant) for steps in reversed(horizons) for variant in VARIANTS for seed in range(args.seeds)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one_run, *zip(*jobs)))
    table = summarise(runs, horizons)
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores), torch one thread per run",
        "seeds": list(range(args.seeds)),
        "horizons": horizons,
        "clip": CLIP,
        "warmup": {steps: warmup_for(steps) for steps in horizons},
        "check": pipeline_check(horizons[0]),
        "table": table,
        "chosen": choose(table, horizons),
        "runs": runs,
    }
    plot(runs, horizons, os.path.join(args.output, "training_defaults.png"))
    print(write_results(args.output, "training_defaults", record, markdown(record)))


if __name__ == "__main__":
    main()
