"""Fuzzing the command line: generated options either run or are refused in one line, never with a traceback.

Hypothesis draws ``layerpipe schedule`` / ``simulate`` / ``compare`` command
lines from every option of those commands with values good and bad —
numbers of every sign, words, empty text, files that do not exist or are
folders, the async and guard options on any schedule — and runs them in
this process.  Each must end with status 0, or status 2 and exactly one
line on stderr that starts with the command's name.  At least 500 cases
run (``FUZZ_CASES`` more).  ``layerpipe train`` is fuzzed through its
refusals only, in ``test_train.py`` and ``test_knobs.py``: a valid
configuration would start processes.
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerpipe.cli import main
from layerpipe.schedule.config import SCHEDULES as REGISTERED

CASES = max(500, int(os.environ.get("FUZZ_CASES", "500")))

SMALL_WHOLE = st.sampled_from(["-3", "-1", "0", "1", "2", "3", "4", "5", "8", "12"])
NUMBER = st.sampled_from(["-1", "0", "0.5", "1", "2.5", "1e9", "inf", "nan", "x", ""])
WORDS = st.sampled_from(
    [
        "",
        "x",
        "none",
        "full",
        "selective",
        "none,full",
        "full,none",
        "stashed",
        "live",
        "double-buffered",
        "spike",
        "predict",
        "spike+predict",
        "priority",
        "bucketed",
        "after-flush",
        "early",
        "end",
        "looping",
        "vshape",
        "contiguous",
        "auto",
    ]
)
SCHEDULES = st.sampled_from([*REGISTERED, "bfs", ""])

OPTIONS = {
    "--schedule": SCHEDULES,
    "--ranks": SMALL_WHOLE,
    "--microbatches": SMALL_WHOLE,
    "--stages-per-rank": SMALL_WHOLE,
    "--group-size": SMALL_WHOLE,
    "--placement": WORDS,
    "--data-parallel": SMALL_WHOLE,
    "--zero": SMALL_WHOLE,
    "--reduce-portions": SMALL_WHOLE,
    "--reduce-order": WORDS,
    "--weight-buffers": SMALL_WHOLE,
    "--update-every": SMALL_WHOLE,
    "--weight-policy": WORDS,
    "--delay-correction": WORDS,
    "--delay-warmup": SMALL_WHOLE,
    "--recompute": WORDS,
    "--step-placement": WORDS,
}
SIMULATE_ONLY = {
    "--forward-time": NUMBER,
    "--backward-time": NUMBER,
    "--input-gradient-share": NUMBER,
    "--p2p-latency": NUMBER,
    "--p2p-bandwidth": NUMBER,
    "--weight-bytes": NUMBER,
    "--calls": SMALL_WHOLE,
}
FLAGS = {
    "schedule": ["--skip-nonfinite", "--lowered"],
    "simulate": ["--skip-nonfinite", "--no-overlap", "--json"],
    "compare": ["--skip-nonfinite", "--no-overlap"],
}


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(["schedule", "simulate", "compare"]))
    options = dict(OPTIONS, **(SIMULATE_ONLY if command != "schedule" else {}))
    names = draw(st.lists(st.sampled_from(sorted(options)), max_size=6, unique=True))
    argv = [command]
    for name in names:
        argv += [name, draw(options[name])]
    argv += draw(st.lists(st.sampled_from(FLAGS[command]), max_size=2, unique=True))
    if draw(st.integers(0, 19)) == 0:
        argv.append("--bogus")
    if command == "compare" and draw(st.booleans()):
        argv += ["--schedules", draw(st.sampled_from(["gpipe,1f1b", "1f1b,bogus", "", "async,breadth-first"]))]
    return argv


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """Return the exit status and stderr of ``layerpipe ARGV`` run here (argparse's exits included)."""
    out, error = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(error):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status, error.getvalue()


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_every_generated_command_line_runs_or_is_refused_in_one_line(argv):
    status, error = run_in_process(argv)
    assert status in (0, 2), (argv, status, error)
    assert "Traceback" not in error, (argv, error)
    if status == 2:
        lines = error.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("layerpipe"), (argv, error)


TRAIN_KEYS = [
    "schedule",
    "ranks",
    "microbatches",
    "stages_per_rank",
    "data_parallel",
    "zero",
    "recompute",
    "update_every",
    "weight_policy",
    "delay_correction",
    "skip_nonfinite",
    "steps",
    "batch_size",
    "learning_rate",
    "width",
    "heads",
    "blocks",
    "block_size",
    "dropout",
    "precision",
    "optimizer",
    "checkpoint_every",
    "keep",
    "max_restarts",
    "timeout",
    "resume",
    "stages",
    "bogus_key",
    "model",
    "spatial",
    "crop",
    "channels",
    "sparsity",
    "sparsity_method",
    "sparse_kernel",
    "init_from",
]
TOML_VALUES = st.sampled_from(
    [
        "1",
        "0",
        "-2",
        "3",
        "8",
        "32",
        "2.5",
        '"x"',
        '"async"',
        '"breadth-first"',
        '"fp16"',
        '"sgd"',
        '"stashed"',
        '"spike"',
        '"full"',
        "true",
        "false",
        "[1, 2]",
        '"nowhere"',
        "1e400",
        '""',
        "{a = 1}",
    ]
)


@st.composite
def toml_files(draw) -> str:
    keys = draw(st.lists(st.sampled_from(TRAIN_KEYS), max_size=6, unique=True))
    lines = [f"{key} = {draw(TOML_VALUES)}" for key in keys]
    if draw(st.integers(0, 9)) == 0:
        lines.append(draw(st.sampled_from(["not toml at all", "x = ", "[table", "a = 1\na = 2"])))
    lines.append("steps = 0")  # never a valid run: this test starts no process
    return "\n".join(lines)


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(toml_files())
def test_every_generated_train_config_file_is_refused_in_one_line_before_any_process_starts(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("toml")
    path = folder / "run.toml"
    path.write_text(text)
    status, error = run_in_process(["train", "--config", str(path), "--output", str(folder / "out")])
    assert status == 2, (text, status, error)
    lines = error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerpipe train: error: "), (text, error)
    assert "Traceback" not in error
    assert not (folder / "out").exists() or not any((folder / "out").iterdir()), "nothing written"


def _write_a_checkpoint(folder: str) -> None:
    import torch
    from torch import nn

    import layerpipe
    from layerpipe.runtime.checkpoint import save_checkpoint

    torch.manual_seed(0)
    pipe = layerpipe.Pipeline(
        [nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)],
        nn.functional.mse_loss,
        schedule="gpipe",
        microbatches=2,
        timeout=30,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.1),
    )
    pipe.train_step(torch.randn(4, 4), torch.randn(4, 2))
    save_checkpoint(pipe, folder, {"step": 1})


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory) -> str:
    import layerpipe

    folder = str(tmp_path_factory.mktemp("checkpoint") / "step-1")
    layerpipe.launch(_write_a_checkpoint, 1, (folder,))
    return folder


DAMAGES = st.sampled_from(
    [
        "truncate",
        "flip",
        "delete",
        "extra",
        "empty",
        "manifest-list",
        "manifest-files",
        "manifest-entry",
        "manifest-bytes",
        "manifest-not-json",
        "nothing",
    ]
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(damage=DAMAGES, which=st.integers(0, 20), where=st.floats(0, 1))
def test_a_damaged_checkpoint_folder_is_verified_or_refused_in_one_line(
    checkpoint_folder, tmp_path_factory, damage, which, where
):
    import json
    import shutil

    from layerpipe.checkpoint_files import CheckpointError, verify_checkpoint
    from layerpipe.runtime.checkpoint import load_weights

    folder = tmp_path_factory.mktemp("damaged") / "step-1"
    shutil.copytree(checkpoint_folder, folder)
    names = sorted(os.listdir(folder))
    target = folder / names[which % len(names)]
    manifest = folder / "manifest.json"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: int(where * target.stat().st_size)])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        if data:
            data[int(where * (len(data) - 1))] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    elif damage == "extra":
        (folder / "unlisted.bin").write_bytes(b"\x80\x04")
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage.startswith("manifest-"):
        content = json.loads(manifest.read_text())
        change = {
            "manifest-list": [],
            "manifest-files": dict(content, files=[1, 2]),
            "manifest-entry": dict(content, files={names[0]: "digest"}),
            "manifest-bytes": dict(content, files={name: {"bytes": "many", "sha256": 3} for name in names}),
            "manifest-not-json": None,
        }[damage]
        manifest.write_text("{not json" if change is None else json.dumps(change))
    try:
        verify_checkpoint(str(folder))
        load_weights(str(folder))
    except CheckpointError as error:
        assert "\n" not in str(error) and str(error).startswith("checkpoint"), str(error)


TRAIN_OPTIONS = {
    **OPTIONS,
    "--steps": SMALL_WHOLE,
    "--batch-size": SMALL_WHOLE,
    "--width": SMALL_WHOLE,
    "--heads": SMALL_WHOLE,
    "--blocks": SMALL_WHOLE,
    "--block-size": SMALL_WHOLE,
    "--dropout": NUMBER,
    "--learning-rate": NUMBER,
    "--precision": st.sampled_from(["fp32", "bf16", "fp16", "fp8", ""]),
    "--optimizer": st.sampled_from(["adamw", "sgd", "lion"]),
    "--checkpoint-every": SMALL_WHOLE,
    "--keep": SMALL_WHOLE,
    "--max-restarts": SMALL_WHOLE,
    "--max-skips": SMALL_WHOLE,
    "--timeout": NUMBER,
    "--resume": st.sampled_from(["nowhere", "", "."]),
    "--seed": SMALL_WHOLE,
    "--model": st.sampled_from(["gpt", "superres", "vit", ""]),
    "--spatial": SMALL_WHOLE,
    "--crop": SMALL_WHOLE,
    "--channels": SMALL_WHOLE,
    "--sparsity": st.sampled_from(["2:4", "5:4", "0:4", "1:64", "2:128", "x", ""]),
    "--sparsity-method": st.sampled_from(["fixed", "sr-ste", "lottery"]),
    "--sparse-kernel": st.sampled_from(["dense", "gather", "cuda"]),
    "--init-from": st.sampled_from(["nowhere", "", "."]),
}


@st.composite
def train_command_lines(draw) -> list[str]:
    names = draw(st.lists(st.sampled_from(sorted(TRAIN_OPTIONS)), max_size=6, unique=True))
    argv = ["train"]
    for name in names:
        argv += [name, draw(TRAIN_OPTIONS[name])]
    if draw(st.booleans()):
        argv.append("--skip-nonfinite")
    return argv + ["--steps", "0"]  # never a valid run: this test starts no process


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train_command_lines())
def test_every_generated_train_command_line_is_refused_in_one_line_before_any_process_starts(tmp_path_factory, argv):
    folder = tmp_path_factory.mktemp("train")
    status, error = run_in_process(argv + ["--output", str(folder / "out")])
    assert status == 2, (argv, status, error)
    lines = error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerpipe train: error: "), (argv, error)
    assert not (folder / "out").exists(), "nothing written"


COST_KEYS = [
    "forward_time",
    "backward_time",
    "input_gradient_share",
    "recompute_time",
    "optimizer_time",
    "p2p_latency",
    "p2p_bandwidth",
    "boundary_bytes",
    "activation_bytes",
    "weight_bytes",
    "data_parallel_latency",
    "data_parallel_bandwidth",
    "overlap",
    "about",
    "speed",
]
COST_VALUES = st.sampled_from(
    [
        "1",
        "0",
        "-2",
        "2.5",
        "inf",
        "nan",
        "-inf",
        "1e400",
        '"x"',
        "true",
        "[1, 2]",
        "[1.0, 2.0, 3.0, 4.0]",
        "[]",
        "[-1, 2, 3, 4]",
        "{a = 1}",
        '""',
    ]
)


@st.composite
def cost_files(draw) -> str:
    keys = draw(st.lists(st.sampled_from(COST_KEYS), max_size=6, unique=True))
    lines = [f"{key} = {draw(COST_VALUES)}" for key in keys]
    if draw(st.integers(0, 9)) == 0:
        lines.append(draw(st.sampled_from(["not toml at all", "x = ", "[table", "a = 1\na = 2", "\x00"])))
    return "\n".join(lines)


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cost_files(), st.sampled_from(["simulate", "compare"]))
def test_every_generated_cost_file_is_simulated_or_refused_in_one_line(tmp_path_factory, text, command):
    path = tmp_path_factory.mktemp("cost") / "cost.toml"
    path.write_text(text)
    status, error = run_in_process([command, "--ranks", "2", "--microbatches", "4", "--cost-file", str(path)])
    assert status in (0, 2), (text, status, error)
    if status == 2:
        lines = error.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"layerpipe {command}: error: "), (text, error)


PLAN_OPTIONS = {
    "--model": st.sampled_from(["demo", "gpt-52b", "gpt-9000", "", "/no/such/model.toml", "."]),
    "--gpus": SMALL_WHOLE,
    "--gpu-memory": NUMBER,
    "--global-batch": SMALL_WHOLE,
    "--cluster": st.sampled_from(["a100", "h100", "tpu", ""]),
    "--top": SMALL_WHOLE,
    "--max-stages-per-rank": SMALL_WHOLE,
    "--max-microbatch-size": SMALL_WHOLE,
    "--cost-file": st.sampled_from(["/no/such/cost.toml", "."]),
    "--jobs": st.sampled_from(["-1", "x", "1"]),
}


@st.composite
def plan_command_lines(draw) -> list[str]:
    names = draw(st.lists(st.sampled_from(sorted(PLAN_OPTIONS)), max_size=5, unique=True))
    argv = ["plan", "--jobs", "1"]
    for name in names:
        argv += [name, draw(PLAN_OPTIONS[name])]
    return argv


@settings(max_examples=CASES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_command_lines())
def test_every_generated_plan_command_line_plans_or_is_refused_in_one_line(tmp_path_factory, argv):
    output = tmp_path_factory.mktemp("plan") / "plan.toml"
    status, error = run_in_process(argv + ["--output", str(output)])
    assert status in (0, 2), (argv, status, error)
    if status == 2:
        assert len(error.strip().splitlines()) == 1 and error.startswith("layerpipe"), (argv, error)
        assert not output.exists(), argv
    else:
        assert output.exists(), argv
