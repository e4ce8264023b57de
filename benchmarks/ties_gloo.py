"""Measured: what summing a weight tied across stages costs a step (gloo).

    python benchmarks/ties_gloo.py [--repeats 15] [--quick]

A language-model-like chain: a first ``Linear(width, width)`` whose weight the
last layer uses again (as an embedding and its head), with ``2 × Linear`` and
``Tanh`` between, cut into four stages on two pipeline ranks, m = 4, SGD.
Two variants side by side: the head with a weight of its own (untied, no
``TIE``), and the head holding the first layer's weight (tied: its copies on
the first and last stage, their gradients summed by one ``TIE`` a step).
Layouts: breadth-first with the looping placement (the holders on ranks 0
and 1: one all-reduce of ``width²`` gradients between them), breadth-first
with the V-shape placement (both holders on rank 0: a local sum, no
message), and the looping layout at 2 × 2 with ZeRO-1.  Steps of the
variants are interleaved (A B A B ...), each bracketed by barriers; the
table gives the median step time, the ratio to untied and the median time
of the ``TIE`` on rank 0 (its wait for the other holder included).  Results
go to ``benchmarks/results/ties_gloo.{json,md}``.
"""

from __future__ import annotations

import datetime
import os
import statistics

import torch
from results_files import gloo_machine, repeated_benchmark_arguments, write_results
from timing import time_alternately
from torch import nn

import layerpipe
from layerpipe.schedule.actions import Kind

LAYOUTS = {
    "2 x 1, looping (holders on ranks 0 and 1)": (2, dict(placement="looping")),
    "2 x 1, V-shape (holders on rank 0)": (2, dict(placement="vshape")),
    "2 x 2, looping, ZeRO-1": (4, dict(placement="looping", data_parallel=2, zero=1)),
}


class TiedHead(nn.Module):
    """``x @ weight.T`` with a weight given to it (the first layer's, or a copy of its own)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.T


def layers(width: int, tied: bool) -> list[nn.Module]:
    """Return the chain: ``Linear``, 3 × (``Linear``, ``Tanh``, ``Linear``), a head on the first weight or a copy."""
    torch.manual_seed(0)
    first = nn.Linear(width, width)
    middle = [module for _ in range(3) for module in (nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))]
    weight = first.weight if tied else nn.Parameter(first.weight.detach().clone())
    return [first, *middle, TiedHead(weight)]


def worker(repeats: int, width: int, layout: dict) -> tuple:
    """Time both variants' steps, interleaved; return the times and each variant's median ``TIE`` time."""
    torch.set_num_threads(1)
    pipes = {
        name: layerpipe.Pipeline(
            layers(width, tied), nn.functional.mse_loss, schedule="breadth-first", microbatches=4,
            stages_per_rank=2, timeout=300, optimizer=lambda params: torch.optim.SGD(params, lr=1e-3), **layout,
        )
        for name, tied in (("untied", False), ("tied", True))
    }  # fmt: skip
    assert pipes["tied"].schedule.config.ties == ((0, 3),) and not pipes["untied"].schedule.config.ties
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(16, width, generator=generator), torch.randn(16, width, generator=generator)
    sums: dict[str, list[float]] = {name: [] for name in pipes}
    times = time_alternately(pipes, repeats, inputs, targets, after=lambda name, pipe: _note(sums[name], pipe))
    return times, {name: statistics.median(found) if found else 0.0 for name, found in sums.items()}


def _note(sums: list, pipe) -> None:
    """Add the time of the last step's ``TIE`` on this process."""
    sums += [end - start for _, _, action, start, end in pipe.last_result.events if action.kind is Kind.TIE]


def main() -> None:
    args = repeated_benchmark_arguments(__doc__, "width 64 and 3 repetitions (for a test of the script)")
    width, repeats = (64, 3) if args.quick else (512, args.repeats)
    today, machine = datetime.date.today().isoformat(), gloo_machine()
    lines = [
        f"# The cost of summing a weight tied across stages, measured ({today})",
        "",
        f"Machine: {machine}. Breadth-first, v = 2, 4 stages, Linear({width}) layers, the first layer's weight "
        f"used again by the head ({width}² gradients summed), m = 4, batch 16, SGD; {repeats} interleaved "
        f"repetitions, medians.",
        "",
        "| layout | variant | step (ms) | ratio to untied | TIE on rank 0 (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    record = {"date": today, "machine": machine, "width": width, "repeats": repeats, "times": {}, "tie_medians": {}}
    for layout, (processes, options) in LAYOUTS.items():
        per_process = layerpipe.launch(worker, processes, (repeats, width, options), timeout=1800)
        times, sums = per_process[0]
        medians = {name: statistics.median(samples) for name, samples in times.items()}
        lines += [
            f"| {layout} | {name} | {1e3 * value:.1f} | {value / medians['untied']:.3f} | {1e3 * sums[name]:.2f} |"
            for name, value in medians.items()
        ]
        record["times"][layout], record["tie_medians"][layout] = times, sums
    record["load_average"] = os.getloadavg()
    lines += [
        "",
        f"Load average (1, 5, 15 minutes) at the end: {', '.join(f'{load:.1f}' for load in os.getloadavg())}.",
    ]
    print(write_results(args.output, "ties_gloo", record, lines))


if __name__ == "__main__":
    main()
