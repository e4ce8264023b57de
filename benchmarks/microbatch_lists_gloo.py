"""Measured: what micro-batches of different shapes cost a step (gloo), beside one batch of one shape.

    python benchmarks/microbatch_lists_gloo.py [--repeats 15] [--quick]

The demo GPT (4 blocks, width 128, float32), 1F1B on 2 ranks, m = 4, SGD,
about 128 tokens per micro-batch in every variant.  A list of micro-batches
of different shapes agrees none: every activation and gradient message
sends a header of its shapes first (its receive posted ahead, the tensors'
receives posted when it arrives).  Variants, interleaved (A B C D E A B C D
E ...), each step bracketed by barriers:

* one batch tensor, 8 × 64 (today's path);
* a list of four 2 × 64 micro-batches (one shape: agreed as a batch's, no header; the list's checks and token
  weights);
* a list of three 2 × 64 and one 2 × 63 (about the same compute, but the shapes differ: every message sends a
  header first);
* a list of 4 × 32, 2 × 64, 1 × 128 and 2 × 64 (headers; the attention of the longer sequences costs more);
* a list whose third micro-batch has a length never met before at every step (headers; nothing agreed).

The table gives the median step time, its quartiles, the ratio to the
batch tensor, and the median time each rank waited at its ``RECV`` actions
per step (where a late header or tensor would show).
Results go to ``benchmarks/results/microbatch_lists_gloo.{json,md}``.
"""

from __future__ import annotations

import datetime
import itertools
import os
import statistics

import torch
from results_files import gloo_machine, repeated_benchmark_arguments, write_results
from timing import time_steps_alternately

import layerpipe
from layerpipe.models.config import GPTConfig
from layerpipe.models.gpt import gpt_layers, next_token_loss
from layerpipe.schedule.actions import Kind

MODEL = GPTConfig(vocab_size=65, block_size=1024, width=128, heads=4, blocks=4)
QUICK_MODEL = GPTConfig(vocab_size=65, block_size=1024, width=32, heads=2, blocks=2)
RECEIVES = (Kind.RECV_F, Kind.RECV_B)
SHAPES = {
    "same": [(2, 64)] * 4,
    "one shorter": [(2, 64)] * 3 + [(2, 63)],
    "different": [(4, 32), (2, 64), (1, 128), (2, 64)],
}


def tokens(rows: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return random ids of ``rows × length`` and their next-token targets."""
    ids = torch.randint(0, MODEL.vocab_size, (rows, length + 1), generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def listed(shapes: list[tuple[int, int]], generator: torch.Generator) -> tuple[list, list]:
    """Return a list of micro-batches of ``shapes`` and their targets."""
    pairs = [tokens(rows, length, generator) for rows, length in shapes]
    return [ids for ids, _ in pairs], [labels for _, labels in pairs]


def worker(repeats: int, model: GPTConfig) -> dict:
    """Time every variant's steps, interleaved; return the times (every process's are the slowest's)."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    pipe = layerpipe.Pipeline(
        gpt_layers(model), next_token_loss, "1f1b", microbatches=4, timeout=600,
        optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
    )  # fmt: skip
    batch = tokens(8, 64, generator)
    same, different = listed(SHAPES["same"], generator), listed(SHAPES["different"], generator)
    shorter = listed(SHAPES["one shorter"], generator)
    fresh = (16 + 2 * k for k in itertools.count())  # 16, 18, ...: tokens of the third micro-batch vary by little

    def new_length():
        length = next(fresh)
        inputs, targets = listed(SHAPES["different"], generator)
        inputs[2], targets[2] = tokens(max(1, 128 // length), length, generator)
        return pipe.train_step(inputs, targets)

    steps = {
        "one batch tensor, 8 × 64 (fixed shape)": lambda: pipe.train_step(*batch),
        "list, four 2 × 64 (one shape: agreed, no header)": lambda: pipe.train_step(*same),
        "list, 2 × 64 three times and 2 × 63 (headers)": lambda: pipe.train_step(*shorter),
        "list, 4 × 32, 2 × 64, 1 × 128, 2 × 64 (headers)": lambda: pipe.train_step(*different),
        "list with a length never met before (headers)": new_length,
    }
    waits: dict[str, list[float]] = {name: [] for name in steps}
    times = time_steps_alternately(steps, repeats, after=lambda name: waits[name].append(_receive_wait(pipe)))
    return {"times": times, "receive_waits": waits}


def _receive_wait(pipe) -> float:
    """Return the seconds the last step waited at its RECVs on this process (header and tensors)."""
    return sum(end - start for _, _, action, start, end in pipe.last_result.events if action.kind in RECEIVES)


def main() -> None:
    args = repeated_benchmark_arguments(__doc__, "width 32, 2 blocks and 3 repetitions (for a test of the script)")
    model, repeats = (QUICK_MODEL, 3) if args.quick else (MODEL, args.repeats)
    today, machine = datetime.date.today().isoformat(), gloo_machine()
    found = layerpipe.launch(worker, 2, (repeats, model), timeout=3600)
    times = found[0]["times"]
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    quartiles = {name: statistics.quantiles(samples, n=4) for name, samples in times.items()}
    waits = {name: [statistics.median(f["receive_waits"][name]) for f in found] for name in times}
    base = next(iter(medians.values()))
    lines = [
        f"# Micro-batches of different shapes against one shape, measured ({today})",
        "",
        f"Machine: {machine}. GPT of {model.blocks} blocks, width {model.width}, float32; 1F1B on 2 ranks, m = 4, "
        f"128 tokens per micro-batch, SGD; {repeats} interleaved repetitions, medians.",
        "",
        "| variant | step (ms) | quartiles (ms) | ratio to one batch tensor | waits at RECVs, rank 0 / 1 (ms) |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {1e3 * value:.1f} | {1e3 * quartiles[name][0]:.1f}–{1e3 * quartiles[name][2]:.1f} | "
            f"{value / base:.3f} | {' / '.join(f'{1e3 * wait:.2f}' for wait in waits[name])} |"
            for name, value in medians.items()
        ),
        "",
        f"Load average (1, 5, 15 minutes) at the end: {', '.join(f'{load:.1f}' for load in os.getloadavg())}.",
    ]
    record = {"date": today, "machine": machine, "model": model.to_json(), "repeats": repeats, "times": times}
    record["receive_wait_medians"] = waits
    print(write_results(args.output, "microbatch_lists_gloo", record, lines))


if __name__ == "__main__":
    main()
