"""Each knob is defined once: every entry point lists it with the same help and refuses its bad values in its own spelling.

Entry points: Python (``ScheduleConfig(...)``, ``CostModel``, ``GPTConfig``,
``TrainConfig``), ``layerpipe simulate``, ``layerpipe train`` and
``layerpipe train``'s TOML files.
"""

from __future__ import annotations

import dataclasses

import pytest

from layerpipe.cli import build_parser as layerpipe_parser
from layerpipe.cli import main as layerpipe_main
from layerpipe.knobs import ConfigError, check_fields, knobs
from layerpipe.models.config import GPTConfig, SuperResConfig
from layerpipe.plan import PlanRequest
from layerpipe.run_options import RunOptions
from layerpipe.schedule.config import ScheduleConfig, validate_config
from layerpipe.sim.cost import CostModel
from layerpipe.train.config import PARTS, TrainConfig, config_from
from layerpipe.train.config import build_parser as train_parser

BAD = {
    # ScheduleConfig
    "schedule": "bogus",
    "ranks": 0,
    "microbatches": 0,
    "stages_per_rank": 0,
    "group_size": 0,
    "placement": "bogus",
    "data_parallel": 0,
    "zero": 7,
    "reduce_portions": 0,
    "reduce_order": "bogus",
    "weight_buffers": 0,
    "recompute": "bogus",
    "update_every": 0,
    "weight_policy": "newest",
    "delay_correction": "adam",
    "delay_warmup": -1,
    "optimizer": "lion",
    "checkpoint_every": -1,
    "keep": 0,
    "max_skips": 0,
    "max_restarts": -1,
    "warmup_steps": -1,
    "tensorboard": "/dev/null",  # an existing file, not a folder
    "precision": "fp8",
    "sparsity": "5:4",
    "sparsity_method": "magic",
    "sparse_kernel": "cuda",
    "model": "resnet",
    "spatial": 0,
    "channels": 0,
    "crop": 30,
    # CostModel
    "forward_time": -1.0,
    "backward_time": -1.0,
    "action_overhead": -1.0,
    "input_gradient_share": 2.0,
    "recompute_time": -1.0,
    "optimizer_time": -1.0,
    "clip_time": -1.0,
    "p2p_latency": -1.0,
    "p2p_bandwidth": 0.0,
    "boundary_bytes": -1.0,
    "activation_bytes": -1.0,
    "weight_bytes": -1.0,
    "tie_bytes": -1.0,
    "data_parallel_latency": -1.0,
    "data_parallel_bandwidth": 0.0,
    "send_time": -1.0,
    "receive_time": -1.0,
    "variation": -1.0,
    "hold_variation": -1.0,
    "step_placement": "late",
    "clip_grad_norm": 0.0,
    # PlanRequest
    "gpus": 0,
    "gpu_memory": 0.0,
    "global_batch": 0,
    "cluster": "tpu",
    "top": 0,
    "max_stages_per_rank": 0,
    "max_microbatch_size": 0,
    "jobs": -1,
    # GPTConfig
    "block_size": 0,
    "width": 0,
    "heads": 0,
    "blocks": 0,
    "dropout": 1.0,
    "length_buckets": -1,
    # TrainConfig
    "steps": 0,
    "batch_size": 0,
    "learning_rate": 0.0,
    "seed": -1,
    "sample_length": -1,
    "timeout": 0.0,
    "check_every": -1,
}
"""A value each knob with a validity rule refuses."""

CHECKED = [
    (cls, field.name)
    for cls in (ScheduleConfig, CostModel, GPTConfig, SuperResConfig, TrainConfig, PlanRequest, RunOptions)
    for field in knobs(cls)
    if field.metadata.get("check") is not None
]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _text(value) -> str:
    return str(value)


def test_every_knob_with_a_rule_has_a_bad_value_here():
    assert {name for _, name in CHECKED} <= set(BAD)


@pytest.mark.parametrize("cls, name", CHECKED, ids=[name for _, name in CHECKED])
def test_python_names_the_keyword(cls, name):
    with pytest.raises(ConfigError) as caught:
        config = cls(**{name: BAD[name]})
        validate_config(config) if cls is ScheduleConfig else check_fields(config)
    assert caught.value.field == name
    assert str(caught.value).startswith(f"{name}={BAD[name]!r}: ")


SCHEDULE_AND_COST = [(cls, name) for cls, name in CHECKED if cls in (ScheduleConfig, CostModel)]


@pytest.mark.parametrize("cls, name", SCHEDULE_AND_COST, ids=[name for _, name in SCHEDULE_AND_COST])
def test_simulate_names_the_option(cls, name, capsys):
    assert layerpipe_main(["simulate", _flag(name), _text(BAD[name])]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"layerpipe simulate: error: {_flag(name)} {_text(BAD[name])}: ")


TRAINED = [(cls, name) for cls, name in CHECKED if cls in PARTS]


@pytest.mark.parametrize("cls, name", TRAINED, ids=[name for _, name in TRAINED])
def test_train_names_the_option(cls, name, tmp_path):
    arguments = train_parser().parse_args([_flag(name), _text(BAD[name]), "--output", str(tmp_path / "run")])
    with pytest.raises(ConfigError) as caught:
        config_from(arguments)
    assert str(caught.value).startswith(f"{_flag(name)} {_text(BAD[name])}: ")


@pytest.mark.parametrize("cls, name", TRAINED, ids=[name for _, name in TRAINED])
def test_a_toml_file_names_the_key(cls, name, tmp_path):
    path = tmp_path / "run.toml"
    value = BAD[name]
    path.write_text(f"{name} = {value!r}\n".replace("'", '"'))
    arguments = train_parser().parse_args(["--config", str(path), "--output", str(tmp_path / "run")])
    with pytest.raises(ConfigError) as caught:
        config_from(arguments)
    assert str(caught.value).startswith(f"{path}: {name} = {value!r}: ")


def _helps(parser) -> dict[str, str]:
    found = {}
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):  # sub-commands
            continue
        found[action.dest] = action.help
    return found


def _text_of(help_text: str) -> str:
    """Return an option's help as written in its knob: argparse's escaping and the default undone."""
    return help_text.replace("%%", "%").split(" (default: ")[0]


def _subparser(name: str):
    commands = next(
        action for action in layerpipe_parser()._actions if isinstance(getattr(action, "choices", None), dict)
    )
    return commands.choices[name]


def test_simulate_train_and_toml_list_the_same_schedule_knobs_with_the_same_help():
    simulate, train = _helps(_subparser("simulate")), _helps(train_parser())
    owners = {field.name for cls in PARTS for field in knobs(cls)}
    for field in knobs(ScheduleConfig):
        assert field.name in owners, f"TOML files take {field.name}"
        assert _text_of(simulate[field.name]) == _text_of(train[field.name]) == field.metadata["help"], field.name


def test_train_defaults_are_its_own_where_they_differ():
    assert TrainConfig().pipeline.ranks == 2 and ScheduleConfig().ranks == 4
    assert (
        "(default: 2)" in _helps(train_parser())["ranks"] and "(default: 4)" in _helps(_subparser("simulate"))["ranks"]
    )
    assert dataclasses.replace(TrainConfig()).to_json()["ranks"] == 2


def test_train_picks_one_stage_per_rank_for_gpipe_and_two_for_breadth_first(tmp_path):
    output = ["--output", str(tmp_path / "run")]
    assert config_from(train_parser().parse_args(["--schedule", "gpipe", *output])).pipeline.stages_per_rank == 1
    assert config_from(train_parser().parse_args(output)).pipeline.stages_per_rank == 2


def test_python_simulate_refuses_a_bad_cost_model_by_its_field():
    from layerpipe.schedule.build import build_schedule
    from layerpipe.sim.simulator import simulate

    with pytest.raises(ConfigError) as caught:
        simulate(build_schedule(ScheduleConfig()), CostModel(p2p_bandwidth=0))
    assert caught.value.field == "p2p_bandwidth"


def test_a_toml_file_takes_one_recompute_mode_per_stage(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('recompute = ["full", "none", "none", "none"]\n')
    config = config_from(train_parser().parse_args(["--config", str(path), "--output", str(tmp_path / "run")]))
    assert config.pipeline.recompute_modes == ("full", "none", "none", "none")


def test_train_errors_keep_their_field_and_value_for_python_callers(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config_from(train_parser().parse_args(["--ranks", "0", "--output", str(tmp_path / "run")]))
    assert (caught.value.field, caught.value.value) == ("ranks", 0)
    assert str(caught.value) == "--ranks 0: must be a whole number of at least 1"
