"""The demo's loss curve in float32, bfloat16 and float16 (with loss scaling), side by side.

    python benchmarks/precision_curves.py [--steps 300]

Runs ``layerpipe train`` three times with the same seed and a small GPT
(width 64, 2 blocks, 2 ranks, breadth-first), once per ``--precision``
(float16 with ``--skip-nonfinite``, its loss scaling's guard), and draws
the three training-loss curves in one picture; the table gives the final
and held-out losses and the step time.  Results go to
``benchmarks/results/precision_curves.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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


def run(precision: str, steps: int, folder: str) -> dict:
    """Train once in ``precision``; return its summary."""
    extra = ["--skip-nonfinite"] if precision == "fp16" else []
    output = os.path.join(folder, precision)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerpipe.cli",
            "train",
            *MODEL,
            "--steps",
            str(steps),
            "--precision",
            precision,
            *extra,
            "--output",
            output,
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"precision {precision}: training failed\n{done.stderr[-2000:]}")
    with open(os.path.join(output, "summary.json")) as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        summaries = {precision: run(precision, args.steps, folder) for precision in ("fp32", "bf16", "fp16")}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4))
    for precision, summary in summaries.items():
        axes.plot(range(1, len(summary["losses"]) + 1), summary["losses"], linewidth=1, label=precision)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (cross-entropy)")
    axes.set_title("demo GPT on Shakespeare, breadth-first on 2 ranks, by compute precision")
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, os.path.join(args.output, "precision_curves.png"))
    today = datetime.date.today().isoformat()
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)"
    lines = [
        f"# Loss curves by compute precision ({today})",
        "",
        f"Machine: {machine}. `layerpipe train {' '.join(MODEL)} --steps {args.steps} --precision P` "
        f"(fp16 with `--skip-nonfinite`).",
        "",
        "![loss curves](precision_curves.png)",
        "",
        "| precision | final loss | held-out loss | step time (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for precision, summary in summaries.items():
        lines.append(
            f"| {precision} | {summary['final_loss']:.3f} | {summary['eval_loss']:.3f} | "
            f"{1e3 * summary['step_time']:.1f} |"
        )
    record = {
        "date": today,
        "machine": machine,
        "steps": args.steps,
        "runs": {
            precision: {key: summary[key] for key in ("losses", "final_loss", "eval_loss", "step_time")}
            for precision, summary in summaries.items()
        },
    }
    print(write_results(args.output, "precision_curves", record, lines))


if __name__ == "__main__":
    main()
