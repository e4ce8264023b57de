"""The default ``layerpipe train`` of this checkout against another, run in turn: same losses, same step time?

Run: python benchmarks/train_before_after.py --baseline DIR [--rounds 2] [--steps 1000] [-- TRAIN OPTIONS]

``DIR`` is another checkout of layerpipe (e.g. ``git worktree add /tmp/base HEAD~5``).  Each round runs the
baseline's ``layerpipe train`` and then this checkout's, each in a fresh process importing its own layerpipe,
with the same options.  The table gives each run's median step time (``summary.json``'s ``step_time``), the
ratio of the medians over the rounds (this checkout / baseline), and whether every loss of every run equals the
baseline's bit for bit.  Writes ``benchmarks/results/train_before_after.json`` and ``.md``, machine and date named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date

from results_files import write_results

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(library: str, steps: int, options: list[str], folder: str) -> dict:
    """Return the ``summary.json`` of one ``layerpipe train`` run importing layerpipe from ``library``."""
    environment = {**os.environ, "PYTHONPATH": library}
    command = [sys.executable, "-m", "layerpipe.train", "--steps", str(steps), "--output", folder, *options]
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(folder, "summary.json")) as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="another layerpipe checkout to compare against")
    parser.add_argument("--rounds", type=int, default=2, help="baseline-then-this rounds (default: 2)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run (default: 1000)")
    parser.add_argument("--output", default=os.path.join(HERE, "benchmarks", "results"))
    parser.add_argument("train_options", nargs="*", help="options passed on to layerpipe train (after --)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"baseline": [], "this": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name, library in (("baseline", os.path.abspath(args.baseline)), ("this", HERE)):
                folder = os.path.join(scratch, f"{name}-{round_index}")
                runs[name].append(train(library, args.steps, args.train_options, folder))
                print(f"round {round_index + 1} {name}: step {runs[name][-1]['step_time'] * 1e3:.1f} ms", flush=True)
    reference = runs["baseline"][0]["losses"]
    same = all(run["losses"] == reference for name in runs for run in runs[name])
    medians = {name: statistics.median(run["step_time"] for run in runs[name]) for name in runs}
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "steps": args.steps,
        "train_options": args.train_options,
        "step_times": {name: [run["step_time"] for run in runs[name]] for name in runs},
        "ratio": medians["this"] / medians["baseline"],
        "same_losses_bit_for_bit": same,
    }
    lines = [
        f"# layerpipe train, this checkout against a baseline ({record['date']}, {record['machine']})",
        "",
        f"{args.steps} steps, options `{' '.join(args.train_options) or '(defaults)'}`, {args.rounds} rounds in turn.",
        "",
        "| run | step times (ms) | median (ms) |",
        "| --- | --- | ---: |",
        *(
            f"| {name} | {', '.join(f'{t * 1e3:.1f}' for t in record['step_times'][name])} | {medians[name] * 1e3:.1f} |"
            for name in runs
        ),
        "",
        f"Ratio this / baseline: {record['ratio']:.3f}. Every loss equal bit for bit: {'yes' if same else 'NO'}.",
    ]
    print(write_results(args.output, "train_before_after", record, lines))


if __name__ == "__main__":
    main()
