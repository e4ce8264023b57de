"""The operator benchmarks run end to end (tiny sizes, one repetition) and write their tables and pictures.

Their numbers are the benchmarks' to report; this only keeps the scripts working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_operator_benchmark_measures_every_variant(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "operators.py"), "--quick", "--repeats", "1", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "operators.json").read_text())
    assert [set(row["forward_backward"]) for row in record["sparse"]] == [{"dense BLAS", "gather", "dense kernel"}]
    assert {row["stride"] for row in record["conv_transpose"]} == {1, 2, 3, 4}
    assert all(row["multiplies"]["phases"] <= row["multiplies"]["zero_insertion"] for row in record["conv_transpose"])
    assert (tmp_path / "operators.png").stat().st_size > 1000


@pytest.mark.multiprocess
def test_the_sparsity_study_trains_every_variant(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "sparsity_accuracy.py"),
            "--steps",
            "4",
            "--seeds",
            "0",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    variants = json.loads((tmp_path / "sparsity_accuracy.json").read_text())["variants"]
    assert list(variants) == ["dense", "2:4 scratch", "2:4 SR-STE", "2:4 fine-tuned"]
    assert [len(variant["losses"][0]) for variant in variants.values()] == [4, 4, 4, 2]


@pytest.mark.multiprocess
def test_the_spatial_overlap_benchmark_times_every_way(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "spatial_overlap.py"),
            "--quick",
            "--repeats",
            "1",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((tmp_path / "spatial_overlap.json").read_text())["runs"]
    assert set(runs["2"]) == {"per layer", "blocks of 2", "blocks of 3", "one block of 6", "whole image, one process"}
