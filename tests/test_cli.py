import json
import subprocess
import sys

import pytest

from layerpipe.cli import main


def test_schedule_prints_one_line_per_rank(capsys):
    assert main(["schedule", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["rank 0: 0F0 0F1 0B0 0F2 0B1 0B2", "rank 1: 1F0 1B0 1F1 1B1 1F2 1B2"]


def test_schedule_lowered_shows_communication(capsys):
    assert main(["schedule", "--schedule", "gpipe", "-p", "2", "-m", "1", "--lowered", "--data-parallel", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "rank 0: 0F0 0SEND_F0 0RECV_B0 0B0 0REDUCE 0STEP"


def test_simulate_json(capsys):
    assert main(["simulate", "--schedule", "gpipe", "-p", "4", "-m", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bubble_fraction"] == pytest.approx(3 / 11)
    assert {"step_time", "ideal_time", "ranks", "collectives"} <= set(data)
    assert set(data["ranks"][0]) >= {"busy", "idle", "peak_activations"}
    assert set(data["collectives"]) >= {"gather", "reduce"}


def test_simulate_writes_plot_and_trace(tmp_path, capsys):
    plot, trace = tmp_path / "t.png", tmp_path / "t.json"
    assert main(["simulate", "-p", "2", "-m", "4", "--plot", str(plot), "--trace", str(trace)]) == 0
    assert plot.stat().st_size > 1000 and json.loads(trace.read_text())["traceEvents"]


def test_compare_prints_a_row_per_schedule(tmp_path, capsys):
    assert (
        main(["compare", "-p", "2", "-m", "4", "--schedules", "gpipe,breadth-first", "--plot", str(tmp_path / "c.png")])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("gpipe") and out[2].startswith("breadth-first")


@pytest.mark.parametrize(
    "arguments,option",
    [
        (["schedule", "--schedule", "gpipe", "--stages-per-rank", "2"], "--stages-per-rank 2"),
        (["schedule", "--schedule", "grouped", "-p", "4", "-m", "8", "--group-size", "9"], "--group-size 9"),
        (["schedule", "--schedule", "grouped", "-p", "4", "-m", "8"], "--group-size"),
        (["simulate", "--microbatches", "0"], "--microbatches"),
        (["simulate", "--ranks", "-1"], "--ranks"),
        (["simulate", "--schedule", "nope"], "--schedule"),
        (["simulate", "--recompute", "9"], "--recompute 9"),
        (["simulate", "--p2p-bandwidth", "0"], "--p2p-bandwidth 0"),
        (["simulate", "--data-parallel-bandwidth", "0"], "--data-parallel-bandwidth 0"),
        (["simulate", "--forward-time", "inf"], "--forward-time inf"),
        (["simulate", "--zero", "3"], "--zero 3: shards over data-parallel replicas"),
        (["schedule", "--zero", "3"], "--zero 3"),
        (["compare", "--schedules", "grouped"], "--schedules grouped: grouped needs --group-size"),
        (["simulate", "--plot", "/nonexistent-folder/t.png"], "--plot /nonexistent-folder/t.png: the folder"),
        (["simulate", "--plot", "t.bmpx"], "--plot t.bmpx: must end in one of"),
        (["simulate", "--trace", "/nonexistent-folder/t.json"], "--trace /nonexistent-folder/t.json"),
        (["simulate", "--forward-time", "x"], "--forward-time"),
    ],
)
def test_bad_input_is_one_line_naming_the_option(arguments, option):
    run = subprocess.run([sys.executable, "-m", "layerpipe.cli", *arguments], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert option in run.stderr and "Traceback" not in run.stderr


def test_help_explains_each_command():
    for command in ("schedule", "simulate", "compare"):
        run = subprocess.run([sys.executable, "-m", "layerpipe.cli", command, "--help"], capture_output=True, text=True)
        assert run.returncode == 0 and "--microbatches" in run.stdout


def test_plot_and_trace_say_what_they_wrote(tmp_path, capsys):
    plot, trace = tmp_path / "t.svg", tmp_path / "t.json"
    assert main(["simulate", "-p", "2", "-m", "2", "--json", "--plot", str(plot), "--trace", str(trace)]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays one JSON object
    assert captured.err.splitlines() == [f"wrote {plot}", f"wrote {trace}"]


def test_version_and_python_dash_m():
    for command in (["-m", "layerpipe", "--version"], ["-m", "layerpipe.cli", "--version"]):
        run = subprocess.run([sys.executable, *command], capture_output=True, text=True)
        assert run.returncode == 0 and run.stdout.startswith("layerpipe 0.")


def test_help_shows_each_default_once_and_none_empty():
    run = subprocess.run([sys.executable, "-m", "layerpipe", "simulate", "--help"], capture_output=True, text=True)
    text = " ".join(run.stdout.split())
    assert "(default: )" not in text and "(default: None)" not in text
    assert text.count("(default: 8)") == 1  # --microbatches, once


@pytest.mark.parametrize(
    "arguments, text",
    [
        (["simulate", "--forward-time", "1,1,2,2"], "--forward-time 1.0,1.0,2.0,2.0: 4 values for 8 stages"),
        (["compare", "--ranks", "2", "--forward-time", "1,1,2,2"], "compare runs schedules with different numbers"),
        (["simulate", "--calls", "0"], "--calls 0: must be a whole number of at least 1"),
    ],
)
def test_per_stage_costs_and_calls_are_checked_in_one_line(arguments, text, capsys):
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and text in error[0]


def test_per_stage_costs_of_the_right_length_are_used(capsys):
    assert main(["simulate", "-p", "2", "-v", "2", "--forward-time", "1,1,2,2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_time"] > 0


def test_compare_by_default_runs_the_schedules_the_options_allow(capsys):
    assert main(["compare", "-p", "2", "-m", "4", "--data-parallel", "2", "--zero", "3"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert "breadth-first" in names and "async" not in names  # async updates at ZeRO 0 or 1 only


def test_a_reader_that_stops_early_is_no_error():
    run = subprocess.run(
        f"{sys.executable} -m layerpipe simulate -p 16 -v 4 -m 64 | head -1", shell=True, capture_output=True, text=True
    )
    assert run.stdout.startswith("breadth-first") and "Traceback" not in run.stderr


def test_compare_ranks_on_the_mean_times_and_says_it_leaves_the_spread_out(capsys):
    assert main(["compare", "--ranks", "2", "--microbatches", "4", "--variation", "0.3"]) == 0
    drawn = capsys.readouterr().out.splitlines()
    assert main(["compare", "--ranks", "2", "--microbatches", "4"]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert drawn[0].startswith("ranked on the mean compute times and holds (the spreads of 30% and 0% are left out")
    assert drawn[1:] == plain


WITHOUT_TORCH = """
import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is made unimportable by this test")


sys.meta_path.insert(0, NoTorch())
"""
"""Code that makes torch unimportable in the process it starts (as on a laptop without it)."""

TORCH_FREE = (
    "layerpipe.schedule",
    "layerpipe.sim",
    "layerpipe.plan",
    "layerpipe.cli",
    "layerpipe.knobs",
    "layerpipe.options",
    "layerpipe.checkpoint_files",
    "layerpipe.models.config",
    "layerpipe.ops.pattern",
    "layerpipe.train.config",
    "layerpipe.train.command",
    "layerpipe.calibration.command",
)
"""The modules and packages (with every module in them) that must import without torch."""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH + code], capture_output=True, text=True, timeout=300)


def test_the_torch_free_modules_import_no_torch():
    code = f"""
import importlib, pkgutil
for name in {TORCH_FREE!r}:
    module = importlib.import_module(name)
    for found in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
        if not found.name.endswith(".__main__"):  # runs its command
            importlib.import_module(found.name)
assert not [name for name in sys.modules if name.split(".")[0] == "torch"]
print("imported")
"""
    run = run_without_torch(code)
    assert run.returncode == 0 and run.stdout.strip() == "imported", run.stderr[-3000:]


def test_the_top_level_package_imports_no_torch_and_names_its_torch_parts_lazily():
    code = """
import layerpipe
assert {"Pipeline", "launch", "save_checkpoint", "load_checkpoint"} <= set(layerpipe.__all__)
assert not [name for name in sys.modules if name.split(".")[0] == "torch"]
print("imported")
"""
    run = run_without_torch(code)
    assert run.returncode == 0 and run.stdout.strip() == "imported", run.stderr[-3000:]


@pytest.mark.parametrize(
    "arguments",
    [
        *([command, "--help"] for command in ("train", "calibrate", "schedule", "simulate", "compare", "plan")),
        ["schedule", "--lowered"],
        ["simulate"],
        ["compare"],
        ["plan", "--gpus", "8", "--output", "PLAN"],
    ],
)
def test_every_help_and_the_planning_commands_run_without_torch(arguments, tmp_path):
    arguments = [str(tmp_path / "plan.toml") if argument == "PLAN" else argument for argument in arguments]
    run = run_without_torch(f"from layerpipe.cli import main\nsys.exit(main({arguments!r}))")
    assert run.returncode == 0 and run.stdout, run.stderr[-3000:]
