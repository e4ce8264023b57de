"""Does ``layerpipe train`` under torchrun exit 0 every time on a busy machine?

Run: python benchmarks/torchrun_exit_stress.py [--runs 30]
Writes benchmarks/results/torchrun_exit_stress.{json,md} (machine and date included).

A process that leaves a C++ thread joinable at interpreter exit aborts
(``terminate called without an active exception``, exit -6) only now and
then, more often when the machine is busy.  This runs a tiny ``layerpipe
train`` under ``torchrun --standalone --nproc-per-node 2`` ``--runs`` times
while another process keeps one core busy, and counts the exit statuses.
``tests/test_train.py`` checks the cause itself, deterministically: no
gloo thread is left in either process after ``layerpipe.train`` returns.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date

from results_files import write_results

TINY = [
    "--steps",
    "3",
    "--width",
    "32",
    "--heads",
    "2",
    "--blocks",
    "2",
    "--block-size",
    "16",
    "--batch-size",
    "8",
    "--microbatches",
    "4",
    "--sample-length",
    "5",
]


def keep_busy(seconds: float) -> None:
    """Spin on one core for ``seconds``."""
    end = time.monotonic() + seconds
    value = 0
    while time.monotonic() < end:
        value = (value * 31 + 7) % 1_000_003


def one_run(folder: str) -> tuple[int, str]:
    """Return the exit status of one torchrun of layerpipe train and the last lines of its stderr."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "layerpipe.train",
            *TINY,
            "--output",
            folder,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.returncode, "\n".join(done.stderr.strip().splitlines()[-25:])


def commit() -> str:
    """Return the checkout's commit (with ``+`` when layerpipe/ has uncommitted changes), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "../layerpipe"], capture_output=True, text=True, cwd=here, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    measured = commit()
    busy = multiprocessing.Process(target=keep_busy, args=(3600.0,), daemon=True)
    busy.start()
    statuses: collections.Counter = collections.Counter()
    failures = []
    started = time.perf_counter()
    try:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as folder:
                status, last = one_run(os.path.join(folder, "run"))
            statuses[status] += 1
            if status:
                failures.append({"run": run, "status": status, "stderr_tail": last})
            print(f"run {run + 1}/{args.runs}: exit {status}", flush=True)
    finally:
        busy.terminate()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    report = {
        "date": date.today().isoformat(),
        "machine": machine,
        "commit": measured,
        "runs": args.runs,
        "statuses": {str(k): v for k, v in statuses.items()},
        "failures": failures,
        "seconds": time.perf_counter() - started,
    }
    print(write_results(args.output, "torchrun_exit_stress", report, report_lines(report)))


def report_lines(report: dict) -> list[str]:
    """Return the Markdown of a report: what ran, on what, and how many runs ended with each exit status."""
    statuses = report["statuses"]
    return [
        f"# layerpipe train under torchrun on a busy machine ({report['date']}, {report['machine']})",
        "",
        f"{report['runs']} runs of `torchrun --standalone --nproc-per-node 2 -m layerpipe.train` (3 steps, tiny "
        f"model) while one core spins: {statuses.get('0', 0)} exited 0 (commit {report['commit']}, "
        f"{report['seconds']:.0f} s).",
        "",
        "| exit status | runs |",
        "| ---: | ---: |",
        *[f"| {k} | {v} |" for k, v in sorted(statuses.items())],
    ]


if __name__ == "__main__":
    main()
