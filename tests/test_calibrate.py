"""``layerpipe calibrate`` measures the demo on local processes and writes a cost file ``simulate`` reads."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from layerpipe.cli import main as layerpipe_main
from layerpipe.sim.cost_file import read_cost_file

SMALL = [
    "--width",
    "32",
    "--heads",
    "2",
    "--blocks",
    "2",
    "--block-size",
    "32",
    "--batch-size",
    "16",
    "--microbatches",
    "4",
]


def test_calibrate_takes_no_output_folder_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        layerpipe_main(["calibrate", "--output", "cost.toml"])
    assert refused.value.code == 2 and "unrecognized arguments: --output cost.toml" in capsys.readouterr().err
    assert layerpipe_main(["calibrate", "--cost-file", "missing/cost.toml"]) == 2
    assert "--cost-file missing/cost.toml: the folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no layerpipe-run/, no cost.toml folder


@pytest.mark.multiprocess
def test_calibrate_writes_a_cost_file_that_simulate_reads(tmp_path, capsys):
    path = tmp_path / "cost.toml"
    done = subprocess.run(
        [sys.executable, "-m", "layerpipe", "calibrate", *SMALL, "--steps", "3", "--cost-file", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [found.name for found in tmp_path.iterdir()] == ["cost.toml"]  # no layerpipe-run/, nothing else
    assert f"wrote {path}: layerpipe simulate --cost-file {path}" in done.stdout
    cost = read_cost_file(str(path))
    assert len(cost.forward_time) == 4 and all(t > 0 for t in cost.forward_time + cost.backward_time)
    assert all(b > 0 for b in cost.boundary_bytes + cost.weight_bytes + cost.activation_bytes)
    assert cost.p2p_latency > 0 and cost.data_parallel_latency > 0
    with open(path, "rb") as handle:
        about = tomllib.load(handle)["about"]
    assert about["alone_sizes"] == [1, 2, 4, 8, 16] and all(time > 0 for time in about["alone_forward"])
    assert about["alone_forward"][-1] > about["alone_forward"][0]  # 16 sequences take longer than one
    assert about["split_backward"] >= 1 and about["contention"] >= 1
    assert (
        layerpipe_main(
            ["simulate", "--ranks", "2", "--stages-per-rank", "2", "--microbatches", "4", "--cost-file", str(path)]
        )
        == 0
    )
    assert "step time" in capsys.readouterr().out
    assert (
        layerpipe_main(["simulate", "--cost-file", str(path)]) == 0
    )  # on the layout measured, not the default 8 stages
    assert capsys.readouterr().out.startswith("breadth-first: p=2 v=2 m=4")


@pytest.mark.multiprocess
def test_calibrate_measures_a_layout_whose_first_process_holds_only_the_token_stage(tmp_path):
    path = tmp_path / "cost.toml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerpipe",
            "calibrate",
            *SMALL,
            "--schedule",
            "gpipe",
            "--stages-per-rank",
            "1",
            "--steps",
            "2",
            "--timeout",
            "60",
            "--cost-file",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(path, "rb") as handle:
        about = tomllib.load(handle)["about"]
    assert about["split_backward"] == 1.0 and "alone_sizes" not in about  # process 0 holds only the token stage


def test_a_cost_file_in_a_missing_folder_is_refused_before_any_process_starts(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "layerpipe", "calibrate", "--cost-file", str(tmp_path / "no" / "cost.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"layerpipe calibrate: error: --cost-file {tmp_path / 'no' / 'cost.toml'}: the folder {tmp_path / 'no'} "
        f"does not exist"
    ]


@pytest.mark.multiprocess
def test_calibrate_measures_a_zero_three_layout_whose_weights_are_released_between_steps(tmp_path):
    path = tmp_path / "cost.toml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerpipe",
            "calibrate",
            *SMALL,
            "--data-parallel",
            "2",
            "--zero",
            "3",
            "--steps",
            "3",
            "--cost-file",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cost = read_cost_file(str(path))
    assert cost.send_time > 0 and cost.receive_time > 0 and cost.data_parallel_latency > 0


def _one_process_skips_the_measurement():
    import time

    import torch.distributed as dist

    from layerpipe.calibration.probes import set_timeout, shared
    from layerpipe.runtime.stage import PipelineError

    set_timeout(2)
    if dist.get_rank() == 1:  # stays, without measuring, until process 0 has given up
        time.sleep(12)
        return None
    try:
        shared(1.0)
    except PipelineError as error:
        return str(error)
    return "no error"


@pytest.mark.multiprocess
def test_a_calibration_wait_times_out_naming_the_rank_and_what_it_waited_for():
    import layerpipe

    found = layerpipe.launch(_one_process_skips_the_measurement, 2, timeout=60, backend="gloo")[0]
    assert found.startswith("rank 0: timed out after 2 s waiting for process 0's measurement"), found
