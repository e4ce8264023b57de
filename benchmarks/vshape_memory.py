"""Peak activation memory of V-Half and V-Min against 1F1B, measured by the activation meter on gloo.

    python benchmarks/vshape_memory.py [--ranks 4 8]

One model of ``2p`` equal groups of five layers (Linear, Tanh, Linear, Tanh,
Linear; 64 wide inside, 8 between groups, so the saved activations dwarf
what crosses a stage boundary), ``m = 4p`` micro-batches of 2 samples, one
training step on ``p`` processes: 1F1B with one stage of two groups per rank,
V-Half and V-Min with two stages of one group per rank on the V-shape
placement.  The meter (``track_memory=True``) records each rank's peak of
stored activations; the table gives the peak over ranks and its ratio to
1F1B's, beside the ratios Qi et al. state ("Pipeline Parallelism with
Controllable Memory", NeurIPS 2024): ``(p+2)//2 / p`` for V-Half and
``(p+4)//3 / p`` for V-Min, which tend to 1/2 and 1/3 as ``p`` grows (3/4 and
1/2 at ``p = 4``, 5/8 and 1/2 at ``p = 8``).  Memory is counted, not timed,
so the machine's load does not change it.  Results:
``benchmarks/results/vshape_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
from results_files import gloo_machine, write_results
from torch import nn

import layerpipe

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEDULES = ("1f1b", "v-half", "v-min")
STATED = {"1f1b": lambda p: 1.0, "v-half": lambda p: (p + 2) // 2 / p, "v-min": lambda p: (p + 4) // 3 / p}
STATED_TEXT = {"1f1b": "1", "v-half": "(p+2)//2 / p", "v-min": "(p+4)//3 / p"}


def groups(count: int, width: int = 8, hidden: int = 64) -> list[nn.Module]:
    """Return ``count`` groups of five layers whose stored activations are two ``hidden``-wide tanh outputs."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, width)]
    return layers


def peaks(ranks: int) -> dict[str, int]:
    """Worker: one step of each schedule; return this rank's measured peak of stored activations (bytes) by schedule."""
    torch.set_num_threads(1)
    found = {}
    for name in SCHEDULES:
        v_shaped = name != "1f1b"
        pipe = layerpipe.Pipeline(
            groups(2 * ranks),
            nn.functional.mse_loss,
            schedule=name,
            microbatches=4 * ranks,
            stages_per_rank=2 if v_shaped else 1,
            partition=list(range(0, 10 * ranks, 5 if v_shaped else 10)),
            track_memory=True,
            timeout=300,
            optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.0),
        )
        generator = torch.Generator().manual_seed(1)
        samples = 8 * ranks
        pipe.train_step(torch.randn(samples, 8, generator=generator), torch.randn(samples, 8, generator=generator))
        found[name] = pipe.memory()["activations"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    rows = []
    for ranks in args.ranks:
        per_rank = layerpipe.launch(peaks, ranks, (ranks,), timeout=900)
        peak = {name: max(rank[name] for rank in per_rank) for name in SCHEDULES}
        for name in SCHEDULES:
            rows.append(
                {
                    "ranks": ranks,
                    "schedule": name,
                    "peak_bytes": peak[name],
                    "per_rank_bytes": [rank[name] for rank in per_rank],
                    "ratio": peak[name] / peak["1f1b"],
                    "stated": STATED[name](ranks),
                }
            )
    today = datetime.date.today().isoformat()
    lines = [
        f"# V-Half and V-Min against 1F1B: measured peak activation memory ({today})",
        "",
        f"Machine: {gloo_machine()}. One step, `m = 4p`, the same model of `2p` groups; the activation meter's "
        "peak over ranks.",
        "",
        "| p | schedule | peak stored activations (KiB) | / 1F1B's | stated (Qi et al., NeurIPS 2024) |",
        "| ---: | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['ranks']} | {row['schedule']} | {row['peak_bytes'] / 1024:.1f} | {row['ratio']:.3f} | "
            f"{STATED_TEXT[row['schedule']]} = {row['stated']:.3f} |"
        )
    record = {"date": today, "machine": gloo_machine(), "rows": rows}
    print(write_results(args.output, "vshape_memory", record, lines))


if __name__ == "__main__":
    main()
