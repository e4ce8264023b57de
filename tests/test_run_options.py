"""Run-level knobs (``layerpipe.run_options``): one rule each, and the same refusal in Python, on the command line
and in TOML."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

import layerpipe
from layerpipe.knobs import ConfigError, check_fields
from layerpipe.run_options import RunOptions, check_precision, check_spatial
from layerpipe.train.config import build_parser, config_from

FP16_WITH_ASYNC = "needs the guard of a flushed step for its loss scaling, which async has not: use bf16 with async"


def _pipeline_refusal(options: dict) -> str:
    layers = [nn.Linear(4, 4), nn.Linear(4, 4)]
    try:
        layerpipe.Pipeline(layers, nn.functional.mse_loss, microbatches=2, **options)
    except ConfigError as error:
        return str(error)
    return "accepted"


def _command_line_refusal(arguments: list[str], tmp_path) -> str:
    parsed = build_parser().parse_args([*arguments, "--output", str(tmp_path / "never")])
    with pytest.raises(ConfigError) as caught:
        config_from(parsed)
    return str(caught.value)


@pytest.mark.parametrize("guarded", [False, True])
def test_fp16_with_async_is_the_same_line_naming_bf16_in_python_on_the_command_line_and_in_toml(tmp_path, guarded):
    python = layerpipe.launch(
        _pipeline_refusal, 1, (dict(schedule="async", precision="fp16", skip_nonfinite=guarded),)
    )[0]
    assert python == f"precision='fp16': {FP16_WITH_ASYNC}"
    switch = ["--skip-nonfinite"] if guarded else []
    command_line = _command_line_refusal(["--schedule", "async", "--precision", "fp16", *switch], tmp_path)
    assert command_line == f"--precision fp16: {FP16_WITH_ASYNC}"
    path = tmp_path / "run.toml"
    path.write_text(f'schedule = "async"\nprecision = "fp16"\nskip_nonfinite = {str(guarded).lower()}\n')
    toml = _command_line_refusal(["--config", str(path)], tmp_path)
    assert toml == f"{path}: precision = 'fp16': {FP16_WITH_ASYNC}"


def test_the_command_line_says_the_same_line_and_status_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "layerpipe.cli", "train", "--schedule", "async", "--precision", "fp16"]
        + ["--skip-nonfinite", "--output", str(tmp_path / "never")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"layerpipe train: error: --precision fp16: {FP16_WITH_ASYNC}"


def test_fp16_without_the_guard_names_the_switch_in_each_spelling(tmp_path):
    with pytest.raises(ConfigError) as caught:
        check_precision("fp16", False, False)
    reason = "its loss scaling skips the steps whose gradients overflowed, on every rank together"
    assert str(caught.value) == f"precision='fp16': needs skip_nonfinite=True: {reason}"
    assert (
        _command_line_refusal(["--precision", "fp16"], tmp_path)
        == f"--precision fp16: needs --skip-nonfinite: {reason}"
    )
    path = tmp_path / "run.toml"
    path.write_text('precision = "fp16"\n')
    assert _command_line_refusal(["--config", str(path)], tmp_path) == (
        f"{path}: precision = 'fp16': needs skip_nonfinite = true: {reason}"
    )


def test_spatial_chunks_on_the_async_stream_are_refused_alike(tmp_path):
    with pytest.raises(ConfigError) as caught:
        check_spatial(2, True)
    reason = "the async stream does not run on spatial chunks yet: use a flushed schedule"
    assert str(caught.value) == f"spatial=2: {reason}"
    arguments = ["--model", "superres", "--schedule", "async", "--spatial", "2"]
    assert _command_line_refusal(arguments, tmp_path) == f"--spatial 2: {reason}"


@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("precision", "fp8", "choose one of fp32, bf16, fp16"),
        ("spatial", 0, "must be a whole number of chunks per image, at least 1"),
        ("timeout", 0.0, "must be a finite number of seconds above 0"),
        ("check_every", -1, "must be a whole number of steps, 0 for never"),
    ],
)
def test_each_run_level_knob_has_one_rule(name, value, reason):
    with pytest.raises(ConfigError) as caught:
        check_fields(RunOptions(**{name: value}))
    assert str(caught.value) == f"{name}={value!r}: {reason}"


def test_the_run_level_module_imports_no_torch():
    code = "import sys, layerpipe.run_options; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
