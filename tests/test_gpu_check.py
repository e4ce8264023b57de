"""The GPU check runs end to end on the CPU (its dry run: the same code paths, tiny sizes) and lists every check.

Its numbers are the GPU's to report; this keeps the script working where no GPU is, and checks that a check
that fails or runs past its budget is recorded while the others still run.  No test needs a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_writes_every_check_with_the_machine_named(tmp_path, gpu_check):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    assert list(record["checks"]) == list(gpu_check.CHECKS)
    assert {check["status"] for check in record["checks"].values()} == {"passed"}, record["checks"]
    assert record["machine"]["device"] == "cpu" and record["machine"]["backend"] == "gloo"
    assert record["machine"]["host"] and record["machine"]["torch"] == torch.__version__
    assert record["checks"]["overhead"]["losses_equal"]
    assert record["checks"]["overhead"]["overhead_ratio"] > 0
    sparse = record["checks"]["sparse_linear"]["dtypes"]["bfloat16"]
    assert [entry["path"] for entry in sparse["inference"].values()] == ["gather", "dense"]  # semi-structured: CUDA
    table = (tmp_path / "gpu_check-cpu.md").read_text()
    assert all(f"| {name} | passed |" in table for name in gpu_check.CHECKS)


def test_a_failing_check_is_recorded_with_its_error(gpu_check, monkeypatch):
    def broken(context):
        raise ValueError("the kernel refused the shape")

    monkeypatch.setitem(gpu_check.CHECKS, "broken", (broken, 5.0))
    record = gpu_check.run_check("broken", gpu_check.Context(torch.device("cpu"), gpu_check.CPU_SIZES), 5.0)
    assert record["status"] == "error" and not record["passed"]
    assert record["error"] == "ValueError: the kernel refused the shape"
    assert "Traceback" in record["traceback"]


def test_a_check_past_its_budget_is_stopped_and_recorded(gpu_check, monkeypatch):
    def endless(context):
        while True:
            time.sleep(0.01)

    monkeypatch.setitem(gpu_check.CHECKS, "endless", (endless, 0.2))
    start = time.perf_counter()
    record = gpu_check.run_check("endless", gpu_check.Context(torch.device("cpu"), gpu_check.CPU_SIZES), 0.2)
    assert time.perf_counter() - start < 5
    assert record["status"] == "error" and "budget of 0.2 s" in record["error"]


def test_the_results_are_named_by_the_gpu(gpu_check):
    assert gpu_check.result_name({"gpu": "NVIDIA H200", "device": "cuda:0"}) == "gpu_check-nvidia-h200"
    assert gpu_check.result_name({"device": "cpu"}) == "gpu_check-cpu"
