"""The async convergence study runs end to end on the digits and Shakespeare (tiny: one seed, a few updates, two stages).

The script is run as a program, as a user would run it; its numbers are the
benchmark's to report, so this only checks that it trains every variant and
writes its table and picture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "async_convergence.py"


def test_the_study_trains_every_variant_and_writes_its_results(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--text-updates",
            "5",
            "--stages",
            "2",
            "--output",
            str(tmp_path),
            "--plot",
            str(tmp_path / "convergence.png"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=SCRIPT.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "async_convergence.json").read_text())["rows"]
    variants = [
        "synchronous",
        "stashed",
        "live",
        "stashed + spike",
        "stashed + predict",
        "stashed + spike+predict",
        "double-buffered",
        "synchronous, same k",
    ]
    assert [(row["task"], row["variant"]) for row in rows] == [
        (task, variant) for task in ("digits", "shakespeare") for variant in variants
    ]
    assert all(0.1 < row["measure_mean"] <= 1.0 for row in rows if row["task"] == "digits"), rows
    assert all(0 < row["measure_mean"] < 5.0 for row in rows if row["task"] == "shakespeare"), rows
    assert (tmp_path / "convergence.png").stat().st_size > 1000
