"""``layerpipe train --model llama`` against the GPT demo at their default sizes, run in turn: as fast per step?

Run: python benchmarks/llama_demo.py [--rounds 2] [--steps 150] [-- TRAIN OPTIONS]

Each round runs ``layerpipe train --model gpt`` and then ``--model llama``,
each a fresh command with the same options (defaults: 2 ranks, breadth-first,
8 micro-batches, 32 sequences of 64 characters).  The table gives each run's
median step time (``summary.json``'s ``step_time``) and its loss drop, and the
ratio of the medians over the rounds (llama / gpt): the Llama's default sizes
are chosen so that its default run takes about as long as the GPT's.  Writes
``benchmarks/results/llama_demo.json`` and ``.md``, machine and date named.
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
MODELS = ("gpt", "llama")


def train(model: str, steps: int, options: list[str], folder: str) -> dict:
    """Return the ``summary.json`` of one ``layerpipe train --model MODEL`` run of this checkout."""
    environment = {**os.environ, "PYTHONPATH": HERE}
    command = [sys.executable, "-m", "layerpipe.train", "--model", model, "--steps", str(steps), "--output", folder]
    subprocess.run([*command, *options], env=environment, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(folder, "summary.json")) as handle:
        return json.load(handle)


def table(record: dict, medians: dict) -> list[str]:
    """Return the Markdown lines of the results."""
    return [
        f"# layerpipe train: the Llama demo against the GPT demo ({record['date']}, {record['machine']})",
        "",
        f"{record['steps']} steps, options `{' '.join(record['train_options']) or '(defaults)'}`, "
        f"{record['rounds']} rounds in turn (gpt, then llama).",
        "",
        "| model | parameters | step times (ms) | median (ms) | loss drop per run |",
        "| --- | ---: | --- | ---: | --- |",
        *(
            f"| {model} | {record['parameters'][model]:,} | "
            f"{', '.join(f'{t * 1e3:.1f}' for t in record['step_times'][model])} | {medians[model] * 1e3:.1f} | "
            f"{', '.join(f'{100 * drop:.0f} %' for drop in record['loss_drops'][model])} |"
            for model in MODELS
        ),
        "",
        f"Ratio of the median step times, llama / gpt: {record['ratio']:.2f}.",
    ]


def parameters(summary: dict) -> int:
    """Return the model's parameter count from a summary (the Llama's is recorded; the GPT's follows from its sizes)."""
    if "parameters" in summary["model"]:
        return summary["model"]["parameters"]
    sys.path.insert(0, HERE)
    from layerpipe.sim.gpt_costs import GPTShape, layer_parameters

    sizes = {key: summary["model"][key] for key in ("vocab_size", "block_size", "width", "heads", "blocks")}
    return sum(layer_parameters(GPTShape(**sizes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="gpt-then-llama rounds (default: 2)")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default: 150)")
    parser.add_argument("--output", default=os.path.join(HERE, "benchmarks", "results"))
    parser.add_argument("train_options", nargs="*", help="options passed on to layerpipe train (after --)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {model: [] for model in MODELS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for model in MODELS:
                runs[model].append(train(model, args.steps, args.train_options, f"{scratch}/{model}-{round_index}"))
                print(f"round {round_index + 1} {model}: step {runs[model][-1]['step_time'] * 1e3:.1f} ms", flush=True)
    medians = {model: statistics.median(run["step_time"] for run in runs[model]) for model in MODELS}
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        "load_average": os.getloadavg(),
        "steps": args.steps,
        "rounds": args.rounds,
        "train_options": args.train_options,
        "parameters": {model: parameters(runs[model][0]) for model in MODELS},
        "step_times": {model: [run["step_time"] for run in runs[model]] for model in MODELS},
        "loss_drops": {model: [1 - run["final_loss"] / run["first_loss"] for run in runs[model]] for model in MODELS},
        "ratio": medians["llama"] / medians["gpt"],
    }
    print(write_results(args.output, "llama_demo", record, table(record, medians)))


if __name__ == "__main__":
    main()
