"""`layerpipe train`: the main job end to end on small sizes, its config file and its one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

SMALL = [
    "--steps",
    "60",
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
    "--sample-length",
    "20",
    "--learning-rate",
    "0.01",
]


def run_train(*arguments, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "layerpipe.cli", "train", *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


@pytest.mark.multiprocess
def test_train_writes_every_output_and_the_loss_falls(tmp_path):
    output = tmp_path / "run"
    done = run_train(*SMALL, "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert len(summary["losses"]) == 60
    assert summary["first_loss"] == summary["losses"][0] and summary["final_loss"] == summary["losses"][-1]
    assert summary["final_loss"] < 0.8 * summary["first_loss"]
    assert summary["tokens_per_second"] > 0 and summary["step_time"] > 0 and summary["simulated_step_time"] > 0
    assert len(summary["peak_memory_bytes"]) == 2 and all(b > 0 for b in summary["peak_memory_bytes"])
    assert summary["config"]["schedule"] == "breadth-first" and summary["config"]["ranks"] == 2
    for name in ("loss.png", "timeline.png", "timeline.json", "timeline-data.json"):
        assert (output / name).stat().st_size > 0, name
    assert (output / "checkpoints" / "step-60" / "manifest.json").exists()
    assert "sample:" in done.stdout and len(summary["sample"]) >= 20


@pytest.mark.multiprocess
def test_train_with_sharded_data_parallelism_prints_the_layout_and_reports_memory_beside_the_model(tmp_path):
    output = tmp_path / "run"
    done = run_train(
        *SMALL,
        "--steps",
        "4",
        "--data-parallel",
        "2",
        "--zero",
        "3",
        "--recompute",
        "selective",
        "--reduce-portions",
        "2",
        "--output",
        str(output),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 pipeline ranks × 2 data-parallel replicas = 4 processes" in done.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert [entry["process"] for entry in summary["memory"]] == [0, 1, 2, 3]
    for entry in summary["memory"]:
        measured, predicted = entry["measured"], entry["predicted"]
        assert measured["activations"] > 0
        assert abs(measured["activations"] - predicted["activations"]) <= 0.1 * predicted["activations"], entry
        for kind in ("parameters", "gradients", "optimizer"):
            assert measured[kind] == pytest.approx(predicted[kind], rel=0.01), (kind, entry)


@pytest.mark.multiprocess
def test_train_runs_the_async_stream_and_reports_weight_versions_and_measured_staleness(tmp_path):
    output = tmp_path / "run"
    done = run_train(
        *SMALL,
        "--steps",
        "30",
        "--schedule",
        "async",
        "--update-every",
        "2",
        "--optimizer",
        "sgd",
        "--learning-rate",
        "0.3",
        "--delay-correction",
        "spike+predict",
        "--output",
        str(output),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["final_loss"] < 0.9 * summary["first_loss"]
    stages = summary["stream"]["per_stage"]
    assert stages["0"]["staleness_ticks"] == [2] and stages["1"]["staleness_ticks"] == [0]
    assert stages["0"]["weight_versions"] == 2 and stages["1"]["weight_versions"] == 1
    assert stages["0"]["sub_minibatches"] == stages["1"]["sub_minibatches"] == 30 * 4
    assert summary["simulated_step_time"] > 0 and (output / "timeline.png").stat().st_size > 0
    records = json.loads((output / "timeline-data.json").read_text())["metadata"]["version_records"]
    measured = {(record["stage"], record["backward_tick"] - record["forward_tick"]) for record in records}
    assert measured == {(0, 2), (1, 0)}


@pytest.mark.multiprocess
def test_the_checkpoint_loads_back_into_the_model_layers(tmp_path):
    import torch

    from layerpipe.models.gpt import GPTConfig, gpt_layers
    from layerpipe.models.text import CharacterText, load_corpus
    from layerpipe.runtime.checkpoint import load_weights

    output = tmp_path / "run"
    assert run_train(*SMALL, "--steps", "3", "--output", str(output)).returncode == 0
    vocabulary = CharacterText.from_text(*load_corpus()).vocab_size
    sizes = GPTConfig(vocab_size=vocabulary, block_size=32, width=32, heads=2, blocks=2)
    model = torch.nn.Sequential(*gpt_layers(sizes, seed=123))
    model.load_state_dict(load_weights(str(output / "checkpoints" / "step-3")))
    fresh = torch.nn.Sequential(*gpt_layers(sizes, seed=123))
    assert not torch.equal(model[0].tokens.weight, fresh[0].tokens.weight), "trained weights were loaded"


def final_weights(output):
    from layerpipe.checkpoint_files import latest_checkpoint
    from layerpipe.runtime.checkpoint import load_weights

    return load_weights(latest_checkpoint(str(output / "checkpoints")))


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "layout", [["--data-parallel", "2", "--zero", "3", "--recompute", "selective"]], ids=["2x2-zero3-selective"]
)  # 2 × 1: test_a_process_killed_at_any_step_...
def test_a_killed_run_resumes_to_the_same_losses_and_weights_as_a_straight_run(tmp_path, layout):
    import torch

    options = [*SMALL, "--steps", "6", "--checkpoint-every", "2", *layout]
    straight = tmp_path / "straight"
    assert run_train(*options, "--output", str(straight)).returncode == 0
    killed = tmp_path / "killed"
    environment = {**os.environ, "LAYERPIPE_KILL_AT": "1:3"}  # process 1, as step 3 begins: step-2 was written
    done = subprocess.run(
        [sys.executable, "-m", "layerpipe.cli", "train", *options, "--output", str(killed)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert done.returncode == 1 and "signal 9" in done.stderr, done.stderr[-2000:]
    assert sorted(os.listdir(killed / "checkpoints")) == ["step-2"]
    resumed = run_train(*options, "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((straight / "summary.json").read_text())["losses"]
    assert json.loads((killed / "summary.json").read_text())["losses"] == expected
    weights, reference = final_weights(killed), final_weights(straight)
    assert sorted(weights) == sorted(reference)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


@pytest.mark.multiprocess
def test_a_rerun_into_an_old_output_folder_leaves_no_stale_files(tmp_path):
    output = tmp_path / "run"
    assert (
        run_train(*SMALL, "--steps", "4", "--checkpoint-every", "1", "--keep", "3", "--output", str(output)).returncode
        == 0
    )
    (output / "notes.txt").write_text("mine")
    assert run_train(*SMALL, "--steps", "2", "--output", str(output)).returncode == 0
    assert sorted(os.listdir(output / "checkpoints")) == ["step-2"]
    assert (output / "notes.txt").read_text() == "mine", "files the run does not write stay"


@pytest.mark.multiprocess
def test_a_toml_config_sets_options_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'schedule = "1f1b"\nstages_per_rank = 1\nsteps = 2\nwidth = 32\nheads = 2\nblocks = 2\n'
        "block_size = 16\nbatch_size = 8\nmicrobatches = 4\nsample_length = 5\n"
    )
    output = tmp_path / "run"
    done = run_train("--config", str(config), "--steps", "3", "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["config"]["schedule"] == "1f1b" and summary["config"]["steps"] == 3


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--microbatches", "5"], "--batch-size 32: must be a multiple of --microbatches (5)"),
        (["--blocks", "1"], "--blocks 1: the model has 3 layers but 4 stages"),
        (["--schedule", "grouped"], "--group-size: the grouped schedule needs one"),
        (["--steps", "0"], "--steps 0: must be a whole number of at least 1"),
        (["--heads", "3"], "--heads 3: must divide --width (128)"),
        (["--config", "missing.toml"], "--config missing.toml: no such file"),
        (["--data-parallel", "3"], "--batch-size 32: must be a multiple of --microbatches (8) × --data-parallel (3)"),
        (["--data-parallel", "0"], "--data-parallel 0: must be a whole number of at least 1"),
        (["--weight-buffers", "0"], "--weight-buffers 0: must be a whole number of at least 1"),
        (["--zero", "3"], "--zero 3: shards over data-parallel replicas: needs --data-parallel above 1"),
        (["--update-every", "2"], "--update-every 2: only the async schedule takes it"),
        (["--schedule", "async", "--update-every", "0"], "--update-every 0: must be a whole number of at least 1"),
        (
            ["--schedule", "async", "--weight-policy", "newest"],
            "--weight-policy newest: choose one of stashed, double-buffered, live",
        ),
        (
            ["--schedule", "async", "--delay-correction", "spike"],
            "--delay-correction spike: reads SGD's momentum, and the optimizer is adamw: add --optimizer sgd",
        ),
        (
            ["--schedule", "async", "--data-parallel", "2", "--zero", "3", "--batch-size", "16"],
            "--zero 3: async updates each stage on its own after every k backwards: use --zero 0 or 1",
        ),
        (
            ["--schedule", "async", "--weight-policy", "double-buffered", "--update-every", "1"],
            "--update-every 1: double-buffered weights hold two versions",
        ),
        (["--learning-rate", "-1", "--timeout", "0"], "--learning-rate -1.0: must be a finite number above 0"),
        (["--zero", "5"], "--zero 5: choose one of 0, 1, 2, 3"),
        (["--resume", "nowhere"], "--resume nowhere: holds no complete checkpoint"),
        (["--precision", "fp16"], "--precision fp16: needs --skip-nonfinite"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1: must be a whole number of at least 0"),
        (["--recompute", "half"], "--recompute half: choose one of none, full, selective"),
        (["--sparsity", "5:4"], "--sparsity 5:4: needs 1 <= N < M <= 64"),
        (["--sparsity", "0:4"], "--sparsity 0:4: needs 1 <= N < M <= 64"),
        (["--sparsity", "half"], "--sparsity half: must be N:M"),
        (["--sparsity", "2:48"], "--sparsity 2:48: M must divide --width (128)"),
        (["--sparsity-method", "lottery"], "--sparsity-method lottery: choose one of fixed, sr-ste"),
        (["--init-from", "nowhere"], "--init-from nowhere: holds no complete checkpoint"),
        (["--spatial", "2"], "--spatial 2: the GPT's layers see whole sequences, not bands of rows"),
        (["--length-buckets", "65"], "--length-buckets 65: at most --block-size (64)"),
        (["--schedule", "async", "--length-buckets", "2"], "--length-buckets 2: async streams one shape"),
        (["--model", "superres", "--crop", "30"], "--crop 30: must be a multiple of 4"),
        (["--model", "superres", "--spatial", "4", "--crop", "40"], "--crop 40: its low-resolution half must split"),
        (["--model", "superres", "--sparsity", "2:4"], "--sparsity 2:4: applies to --model gpt only"),
        (["--model", "vit"], "--model vit: choose one of gpt, superres"),
        (["--warmup-steps", "-1"], "--warmup-steps -1: must be a whole number of at least 0"),
        (["--steps", "5", "--warmup-steps", "5"], "--warmup-steps 5: must be below --steps (5)"),
        (["--schedule", "async", "--tie-embeddings"], "--schedule async: async updates each stage on its own, so the"),
    ],
)
def test_bad_options_give_one_line_and_status_2(tmp_path, arguments, message):
    done = run_train(*arguments, "--output", str(tmp_path / "never"), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"layerpipe train: error: {message}"), lines
    assert not os.path.exists(tmp_path / "never")


def test_an_unknown_toml_key_is_named(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("stages = 3\n")
    done = run_train("--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert "--config" in done.stderr and "unknown key 'stages'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


AND_THE_THREADS_LEFT = """
import glob, json, os, runpy, sys
try:
    runpy.run_module("layerpipe.train", run_name="__main__", alter_sys=True)  # what -m layerpipe.train runs
except SystemExit as end:
    status = end.code
names = [open(task).read().strip() for task in glob.glob("/proc/self/task/*/comm")]
# One file per process: two processes printing at once interleave their lines.
with open(os.path.join(os.environ["THREADS_FOLDER"], "rank-" + os.environ["RANK"] + ".json"), "w") as handle:
    json.dump(sorted(name for name in names if "gloo" in name), handle)
sys.exit(status)
"""


@pytest.mark.multiprocess
def test_train_runs_under_torchrun_and_leaves_no_process_group_thread(tmp_path):
    """A process group's threads still running at interpreter exit abort the process now and then (exit -6).

    So the command must end them, not merely usually get away with it: after
    ``layerpipe.train`` returns, no gloo thread is left in either process.
    """
    output, script = tmp_path / "run", tmp_path / "train_and_list_threads.py"
    script.write_text(AND_THE_THREADS_LEFT)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            *SMALL,
            "--steps",
            "5",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "THREADS_FOLDER": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["config"]["ranks"] == 2 and len(summary["losses"]) == 5
    if os.path.isdir("/proc/self/task"):  # Linux: thread names are readable
        left = {path.name: json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank-*.json"))}
        assert left == {"rank-0.json": [], "rank-1.json": []}, left


def test_an_output_that_is_a_file_is_refused_before_training(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    done = run_train("--output", str(taken), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"layerpipe train: error: --output {taken}: is a file; name a folder (it is created if missing)"
    ]


def test_an_output_inside_a_file_is_refused_before_training(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    done = run_train("--output", str(taken / "run"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"layerpipe train: error: --output {taken / 'run'}: cannot be written (Not a directory)"
    ]


def test_an_output_holding_a_folder_where_a_result_file_goes_is_refused_before_training(tmp_path):
    (tmp_path / "run" / "loss.png").mkdir(parents=True)
    done = run_train("--output", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"layerpipe train: error: --output {tmp_path / 'run'}: holds a folder named loss.png, a file the run writes"
    ]


@pytest.mark.multiprocess
def test_ctrl_c_ends_every_process_with_one_line_and_status_130(tmp_path):
    # A shell's background job starts with SIGINT ignored, and Python keeps an ignored SIGINT ignored: restore the
    # default, as a terminal would have it, so the test does not depend on how the suite itself was started.
    process = subprocess.Popen(
        [sys.executable, "-m", "layerpipe", "train", *SMALL, "--steps", "100000", "--output", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout.readline().startswith("layout:"), "training started"
        os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches every process of the group
        _, error = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert error.strip().splitlines()[-1] == "layerpipe train: interrupted"
    assert "Traceback" not in error
    with pytest.raises(ProcessLookupError):  # no worker outlived the command
        os.killpg(process.pid, 0)


@pytest.mark.multiprocess
def test_a_run_whose_steps_keep_failing_the_guard_stops_in_one_line(tmp_path):
    done = run_train(
        *SMALL,
        "--steps",
        "20",
        "--skip-nonfinite",
        "--max-skips",
        "2",
        "--learning-rate",
        "1e30",
        "--output",
        str(tmp_path / "run"),
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("layerpipe train: stopped: step ") and "steps in a row skipped, stage " in lines[-1], (
        done.stderr[-2000:]
    )


@pytest.mark.multiprocess
def test_a_process_killed_mid_checkpoint_leaves_it_unused_and_restarts_resume_from_the_one_before(tmp_path):
    import torch

    options = [*SMALL, "--steps", "6", "--checkpoint-every", "2"]
    straight = tmp_path / "straight"
    assert run_train(*options, "--output", str(straight)).returncode == 0
    killed = tmp_path / "killed"
    environment = {**os.environ, "LAYERPIPE_KILL_AT": "1:checkpoint:4", "LAYERPIPE_KILL_ONCE": str(tmp_path / "once")}
    done = subprocess.run(
        [sys.executable, "-m", "layerpipe.cli", "train", *options, "--max-restarts", "1", "--output", str(killed)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 failed: killed by signal 9 (SIGKILL)" in done.stderr and "step-2 (1 of 1)" in done.stderr, (
        done.stderr[-2000:]
    )
    assert (
        json.loads((killed / "summary.json").read_text())["losses"]
        == json.loads((straight / "summary.json").read_text())["losses"]
    )
    weights, reference = final_weights(killed), final_weights(straight)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


@pytest.fixture(scope="module")
def straight_six_steps(tmp_path_factory):
    """A run of 6 steps with a checkpoint every 2, uninterrupted: what every restarted run must end equal to."""
    output = tmp_path_factory.mktemp("straight") / "run"
    assert run_train(*SMALL, "--steps", "6", "--checkpoint-every", "2", "--output", str(output)).returncode == 0
    return output


@pytest.mark.multiprocess
@pytest.mark.parametrize("process, step", [(0, 1), (1, 2), (0, 3), (1, 4), (0, 5)])
def test_a_process_killed_at_any_step_restarts_and_ends_equal_to_the_straight_run(
    tmp_path, straight_six_steps, process, step
):
    import torch

    output = tmp_path / "run"
    environment = {
        **os.environ,
        "LAYERPIPE_KILL_AT": f"{process}:{step}",
        "LAYERPIPE_KILL_ONCE": str(tmp_path / "once"),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerpipe.cli",
            "train",
            *SMALL,
            "--steps",
            "6",
            "--checkpoint-every",
            "2",
            "--max-restarts",
            "1",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"rank {process} failed: killed by signal 9 (SIGKILL)" in done.stderr, done.stderr[-2000:]
    assert (
        json.loads((output / "summary.json").read_text())["losses"]
        == json.loads((straight_six_steps / "summary.json").read_text())["losses"]
    )
    weights, reference = final_weights(output), final_weights(straight_six_steps)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


@pytest.mark.multiprocess
@pytest.mark.parametrize("process, step", [(0, 3), (1, 5)])
def test_torchrun_restarts_a_killed_process_and_the_run_ends_equal_to_the_straight_run(
    tmp_path, straight_six_steps, process, step
):
    """Under ``torchrun --max-restarts 1`` the restarted processes resume from the latest checkpoint on their own.

    Before the restart store had its own prefix, the restarted round read the
    killed round's addresses from torchrun's shared store now and then and
    failed in gloo's ``connectFullMesh`` (3 of 8 tries here).
    """
    import torch

    output = tmp_path / "run"
    environment = {
        **os.environ,
        "LAYERPIPE_KILL_AT": f"{process}:{step}",
        "LAYERPIPE_KILL_ONCE": str(tmp_path / "once"),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            "-m",
            "layerpipe.train",
            *SMALL,
            "--steps",
            "6",
            "--checkpoint-every",
            "2",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "once").exists(), "the fault was never injected"
    assert (
        json.loads((output / "summary.json").read_text())["losses"]
        == json.loads((straight_six_steps / "summary.json").read_text())["losses"]
    )
    weights, reference = final_weights(output), final_weights(straight_six_steps)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


@pytest.fixture(scope="module")
def dense_four_steps(tmp_path_factory):
    output = tmp_path_factory.mktemp("dense") / "run"
    assert run_train(*SMALL, "--steps", "4", "--output", str(output)).returncode == 0
    return output


@pytest.mark.multiprocess
def test_sparse_fine_tuning_starts_from_the_dense_runs_weights_pruned_by_magnitude(tmp_path, dense_four_steps):
    """The blocks' linear layers keep the pattern magnitude pruning chose from the dense weights; the head stays dense."""
    from layerpipe.ops.sparsity import Pattern, nm_offsets

    output = tmp_path / "sparse"
    done = run_train(
        *SMALL, "--steps", "4", "--sparsity", "2:4", "--init-from", str(dense_four_steps), "--output", str(output)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dense, sparse = final_weights(dense_four_steps), final_weights(output)
    assert torch_equal(sparse["1.qkv.offsets"][0], nm_offsets(dense["1.qkv.weight"], Pattern(2, 4)))
    assert torch_equal(sparse["2.mlp.2.offsets"][0], nm_offsets(dense["2.mlp.2.weight"], Pattern(2, 4)))
    head = [name for name in dense if name.endswith("linear.weight")]
    assert head and all(name in sparse for name in head)  # the head stays dense
    losses = json.loads((output / "summary.json").read_text())["losses"]
    assert losses[0] < json.loads((dense_four_steps / "summary.json").read_text())["losses"][0]


def torch_equal(first, second) -> bool:
    import torch

    return torch.equal(first, second)


@pytest.mark.parametrize("trouble", ["sparse", "wider"])
def test_init_from_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path, dense_four_steps, trouble):
    if trouble == "sparse":
        source = tmp_path / "sparse"
        assert run_train(*SMALL, "--steps", "1", "--sparsity", "2:4", "--output", str(source)).returncode == 0
        arguments, reason = [*SMALL], "has no weight 1.qkv.weight: it comes from another model or a sparse run"
    else:
        source = dense_four_steps
        arguments, reason = [*SMALL, "--width", "64"], "holds 0.tokens.weight of shape"
    done = run_train(*arguments, "--init-from", str(source), "--sparsity", "2:4", "--output", str(tmp_path / "run"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith(f"layerpipe train: error: --init-from {source}: ")
        and reason in lines[0]
    ), done.stderr


SUPERRES = [
    "--model",
    "superres",
    "--steps",
    "4",
    "--batch-size",
    "8",
    "--microbatches",
    "2",
    "--crop",
    "16",
    "--channels",
    "8",
]


@pytest.mark.multiprocess
def test_superres_trains_on_bands_of_rows_as_on_whole_images_and_draws_its_comparison(tmp_path):
    whole, bands = tmp_path / "whole", tmp_path / "bands"
    assert run_train(*SUPERRES, "--output", str(whole)).returncode == 0
    done = run_train(*SUPERRES, "--spatial", "2", "--output", str(bands))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 pipeline ranks × 1 data-parallel replicas × 2 spatial chunks = 4 processes" in done.stdout
    assert "held-out PSNR: model " in done.stdout and " dB, bicubic " in done.stdout
    expected, found = (json.loads((folder / "summary.json").read_text()) for folder in (whole, bands))
    assert found["losses"] == pytest.approx(expected["losses"], rel=1e-4)
    assert found["psnr"] == pytest.approx(expected["psnr"], abs=1e-3) and found["psnr_bicubic"] > 20
    assert found["pixels_per_second"] > 0 and (bands / "superres.png").stat().st_size > 1000


def test_a_resume_with_other_steps_says_in_one_line_that_the_cosine_spans_the_new_count():
    from layerpipe.train.config import TrainConfig
    from layerpipe.train.loop import get_lr, steps_change

    config = TrainConfig(steps=8)
    assert steps_change({"step": 4, "steps": 8}, config) is None
    assert steps_change({"step": 4}, config) is None  # a checkpoint that does not record its count
    line = steps_change({"step": 4, "steps": 6}, config)
    assert line == (
        f"resuming step 4 of 8, not of the checkpoint's 6: the learning rate's cosine now spans 8 steps "
        f"({get_lr(4, config):.3g} at step 4 instead of {get_lr(4, TrainConfig(steps=6)):.3g}); the steps taken "
        f"keep theirs"
    )
    assert steps_change({"step": 4, "steps": 6}, TrainConfig(steps=3)) == (
        "resuming step 4 with --steps 3: no step is left to take"
    )


@pytest.mark.multiprocess
def test_a_run_resumed_with_more_steps_prints_the_change_and_goes_on(tmp_path, dense_four_steps):
    import shutil

    output = tmp_path / "run"
    shutil.copytree(dense_four_steps, output)
    done = run_train(*SMALL, "--steps", "6", "--resume", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "resuming step 4 of 6, not of the checkpoint's 4: the learning rate's cosine now spans 6 steps" in done.stdout
    )
    assert len(json.loads((output / "summary.json").read_text())["losses"]) == 6


def test_the_learning_rate_warms_up_linearly_then_decays_by_cosine_and_no_warm_up_is_the_old_rule():
    """Warm-up is on by default (test_training_defaults.py); ``warmup_steps=0`` gives the rule of before."""
    import math

    from layerpipe.train.config import TrainConfig
    from layerpipe.train.loop import get_lr

    warm = TrainConfig(steps=10, warmup_steps=4, learning_rate=1.0)
    rates = [get_lr(step, warm) for step in range(10)]
    assert rates[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]  # (step + 1) / (warmup + 1), then the peak
    assert all(a > b for a, b in zip(rates[4:], rates[5:])) and rates[-1] == pytest.approx(0.1)
    plain = TrainConfig(steps=7, learning_rate=3e-3, warmup_steps=0)
    old = [3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 6))) for step in range(7)]
    assert [get_lr(step, plain) for step in range(7)] == old  # bit for bit: the run of before


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar TensorBoard finds in ``folder``, by tag: (step, value) in order."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_float32(values) -> list[float]:
    """Return ``values`` as TensorBoard stores scalars: rounded to float32."""
    import numpy

    return [float(numpy.float32(value)) for value in values]


@pytest.mark.multiprocess
def test_a_killed_run_with_warm_up_and_clipping_resumes_bit_for_bit_and_its_tensorboard_curves_go_on(tmp_path):
    pytest.importorskip("tensorboard")
    import torch

    from layerpipe.train.config import TrainConfig
    from layerpipe.train.loop import get_lr

    options = [*SMALL, "--steps", "6", "--checkpoint-every", "2", "--warmup-steps", "2"]
    straight = tmp_path / "straight"
    done = run_train(*options, "--output", str(straight), "--tensorboard", str(straight / "tb"))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    environment = {**os.environ, "LAYERPIPE_KILL_AT": "1:3"}  # process 1, as step 3 begins: step-2 was written
    done = subprocess.run(
        [sys.executable, "-m", "layerpipe.cli", "train", *options, "--output", str(killed)]
        + ["--tensorboard", str(killed / "tb")],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert done.returncode == 1 and "signal 9" in done.stderr, done.stderr[-2000:]
    resumed = run_train(*options, "--resume", str(killed), "--tensorboard", str(killed / "tb"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((straight / "summary.json").read_text())
    found = json.loads((killed / "summary.json").read_text())
    assert found["losses"] == expected["losses"] and found["learning_rates"] == expected["learning_rates"]
    assert found["grad_norms"] == expected["grad_norms"] and len(found["grad_norms"]) == 6
    config = TrainConfig(steps=6, warmup_steps=2, learning_rate=0.01)
    assert found["learning_rates"] == [get_lr(step, config) for step in range(6)]
    assert found["learning_rates"][0] < found["learning_rates"][1] < found["learning_rates"][2] == 0.01
    weights, reference = final_weights(killed), final_weights(straight)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
    for summary, folder in ((expected, straight / "tb"), (found, killed / "tb")):
        scalars = read_scalars(folder)
        steps = list(range(1, 7))
        assert scalars["train/loss"] == list(zip(steps, as_float32(summary["losses"])))
        assert scalars["train/learning_rate"] == list(zip(steps, as_float32(summary["learning_rates"])))
        assert [step for step, _ in scalars["train/step_time"]] == steps
        assert [step for step, value in scalars["train/tokens_per_second"] if value > 0] == steps
        assert scalars["eval/loss"] == [(6, as_float32([summary["eval_loss"]])[0])]
        assert scalars["train/grad_norm"] == list(zip(steps, as_float32(summary["grad_norms"])))  # clipped by default


@pytest.mark.multiprocess
def test_with_clipping_tensorboard_shows_each_steps_gradient_norm_as_summary_json_has_it(tmp_path):
    pytest.importorskip("tensorboard")
    options = [*SMALL, "--steps", "3", "--clip-grad-norm", "0.5"]
    done = run_train(*options, "--output", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"))
    assert done.returncode == 0, done.stderr[-3000:]
    norms = json.loads((tmp_path / "run" / "summary.json").read_text())["grad_norms"]
    assert len(norms) == 3 and all(norm > 0 for norm in norms)
    assert read_scalars(tmp_path / "tb")["train/grad_norm"] == list(zip([1, 2, 3], as_float32(norms)))


@pytest.mark.parametrize("inside", [False, True], ids=["a-file", "inside-a-file"])
def test_a_tensorboard_folder_that_is_or_is_inside_a_file_is_refused_before_training(tmp_path, inside):
    pytest.importorskip("tensorboard")
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    folder = taken / "tb" if inside else taken
    done = run_train("--tensorboard", str(folder), "--output", str(tmp_path / "never"), cwd=tmp_path)
    assert done.returncode == 2
    reason = f"cannot be made: {taken} is a file" if inside else "is a file; name a folder (it is created if missing)"
    assert done.stderr.strip().splitlines() == [f"layerpipe train: error: --tensorboard {folder}: {reason}"]
    assert not os.path.exists(tmp_path / "never")


def test_a_checkpoint_without_learning_rates_resumes_with_them_recomputed():
    from layerpipe.train.config import TrainConfig
    from layerpipe.train.loop import get_lr, resumed_history

    written = {"step": 2, "steps": 4, "losses": [4.0, 3.9], "step_times": [0.1, 0.2]}  # before they were kept
    history = resumed_history(written, TrainConfig(steps=6))
    assert history["learning_rates"] == [get_lr(step, TrainConfig(steps=4)) for step in range(2)]
    assert history["losses"] == [4.0, 3.9] and history["step_times"] == [0.1, 0.2]
    assert resumed_history({**written, "learning_rates": [1.0, 2.0]}, TrainConfig())["learning_rates"] == [1.0, 2.0]


def test_tensorboard_not_installed_is_refused_in_one_line_naming_the_extra(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['tensorboard'] = None  # as if it were not installed\n"
        "from layerpipe.cli import main\n"
        f"sys.exit(main(['train', '--tensorboard', 'tb', '--output', {str(tmp_path / 'never')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "layerpipe train: error: --tensorboard tb: needs the tensorboard package: install the extra with "
        "pip install 'layerpipe[tensorboard]'"
    ]
    assert not os.path.exists(tmp_path / "never") and not os.path.exists(tmp_path / "tb")
