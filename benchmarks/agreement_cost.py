"""What the side-effect-free shape agreement and the in-place handling at a stage's start cost, against before.

    python benchmarks/agreement_cost.py [--repeats 15] [--quick]

Two processes (gloo), repetitions interleaved (A B A B ...), each bracketed
by barriers, medians:

- *agreement*: agreeing the boundary shapes of micro-batch 0 on fake tensors
  (now) against passing it through the stages for real without gradients
  and sending the tensors (before); a stack of ``Linear(width)`` layers.
  The agreement runs once per input shape, not per step.
- *training step*: a step whose layers get an alias of each received leaf
  (``stage_entry.entered``, now) against one handing them the leaf itself
  (before) and one handing them a copy (the alternative not taken); small
  layers and many micro-batches so the per-forward cost shows.

Results: ``benchmarks/results/agreement_cost.{json,md}``.
"""

from __future__ import annotations

import datetime
import statistics

import torch
from results_files import gloo_machine, repeated_benchmark_arguments, write_results
from timing import time_steps_alternately
from torch import nn

import layerpipe
from layerpipe.runtime import executor as executor_module


def _agreement_steps(width: int, layers: int, samples: int) -> dict:
    """Return the two agreements of a ``Linear(width)`` stack, as steps to time."""
    torch.manual_seed(0)
    model = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)]
    pipe = layerpipe.Pipeline(model, nn.functional.mse_loss, microbatches=2, stages_per_rank=1, timeout=600)
    agreement, first = pipe.shapes._agreement, (torch.randn(samples, width),)
    return {
        "agreement, real forward (before)": lambda: agreement._share_metas(agreement._agree_real(first)),
        "agreement, fake tensors (now)": lambda: agreement.agree(first),
    }


def _step_steps(width: int, microbatches: int) -> dict:
    """Return training steps handing the layers the received leaves, aliases of them, or copies, to time."""
    torch.manual_seed(0)
    model = [nn.Sequential(nn.ReLU(), nn.Linear(width, width)) for _ in range(8)]
    pipe = layerpipe.Pipeline(model, nn.functional.mse_loss, microbatches=microbatches, timeout=600)
    inputs, targets = torch.randn(4 * microbatches, width), torch.randn(4 * microbatches, width)
    aliases = executor_module.entered

    def handing(given):
        def step():
            executor_module.entered = given
            try:
                pipe.train_step(inputs, targets)
            finally:
                executor_module.entered = aliases

        return step

    return {
        "training step, leaves to the layers (before)": handing(lambda arguments: arguments),
        "training step, aliases to the layers (now)": handing(aliases),
        "training step, copies to the layers (not taken)": handing(
            lambda arguments: tuple(a.clone() if a.requires_grad else a for a in arguments)
        ),
    }


def worker(repeats: int, quick: bool) -> dict[str, list[float]]:
    """Time both pairs alternately; return the times per variant (seconds)."""
    times = time_steps_alternately(_agreement_steps(256 if quick else 1024, 8, 64 if quick else 256), repeats)
    times.update(time_steps_alternately(_step_steps(64, 16), repeats))
    return times


def main() -> None:
    args = repeated_benchmark_arguments(__doc__, "a narrower stack for the agreement", repeats=15)
    times = layerpipe.launch(worker, 2, (args.repeats, args.quick), timeout=1800)[0]
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    names = list(medians)
    today, machine = datetime.date.today().isoformat(), gloo_machine()
    lines = [
        f"# The shape agreement and the in-place handling, against before ({today})",
        "",
        f"Machine: {machine}, shared with other jobs while it ran (ratios taken side by side, repetitions "
        f"interleaved). {args.repeats} repetitions, medians. Agreement: 2 ranks, 8 × Linear"
        f"({256 if args.quick else 1024}) + ReLU, micro-batch {64 if args.quick else 256} samples. Training "
        f"step: 2 ranks × 2 stages, 8 × (ReLU + Linear(64)), 16 micro-batches of 4, one pipeline whose layers "
        f"get the received leaves (before), aliases (now) or copies (what a clone would cost).",
        "",
        "| variant | time (ms) | ratio to before |",
        "| --- | --- | --- |",
    ]
    for group in (names[0:2], names[2:5]):
        before = group[0]
        lines += [f"| {name} | {1e3 * medians[name]:.2f} | {medians[name] / medians[before]:.3f} |" for name in group]
    record = {"date": today, "machine": machine, "arguments": vars(args), "times": times, "medians": medians}
    print(write_results(args.output, "agreement_cost", record, lines))


if __name__ == "__main__":
    main()
