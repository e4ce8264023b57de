"""The planner: its counts of the GPT agree with the real layers, its search finds what trying everything finds,
its output trains, and bad requests get one line."""

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from layerpipe.cli import main
from layerpipe.knobs import ConfigError
from layerpipe.models.config import GPTConfig
from layerpipe.models.gpt import Block, gpt_layers
from layerpipe.plan import (
    GIB,
    MODELS,
    NEAR_TIE,
    USABLE_MEMORY,
    Candidate,
    PlanRequest,
    candidates,
    evaluate,
    hardware_of,
    model_shape,
    plan,
    train_toml,
)
from layerpipe.runtime.memory import ActivationMeter
from layerpipe.sim.cost import CostModel
from layerpipe.sim.cost_file import write_cost_file
from layerpipe.sim.gpt_costs import GPTShape, layer_activation_bytes, layer_forward_flops, layer_parameters
from layerpipe.sim.hardware import PRESETS
from layerpipe.train.config import TrainConfig, build_parser, config_from

SMALL = GPTShape(vocab_size=50, block_size=16, width=32, heads=4, blocks=3)


def _config(shape: GPTShape) -> GPTConfig:
    return GPTConfig(
        vocab_size=shape.vocab_size,
        block_size=shape.block_size,
        width=shape.width,
        heads=shape.heads,
        blocks=shape.blocks,
    )


@pytest.mark.parametrize("shape", [SMALL, GPTShape(vocab_size=80, block_size=64, width=128, heads=4, blocks=4)])
def test_parameter_counts_are_those_of_the_real_layers(shape):
    real = [sum(parameter.numel() for parameter in layer.parameters()) for layer in gpt_layers(_config(shape))]
    assert list(layer_parameters(shape)) == real


def test_the_demo_model_is_the_one_layerpipe_train_trains():
    from layerpipe.train.config import TrainConfig
    from layerpipe.train.tasks import task_for

    model = task_for(TrainConfig()).model
    assert MODELS["demo"] == GPTShape(model.vocab_size, model.block_size, model.width, model.heads, model.blocks)


def test_block_and_head_flops_are_those_torch_counts():
    layers = gpt_layers(_config(SMALL))
    microbatch = 3
    hidden = torch.randn(microbatch, SMALL.block_size, SMALL.width)
    counted = []
    for layer in layers[1:]:
        with FlopCounterMode(display=False) as counter:
            layer(hidden)
        counted.append(counter.get_total_flops())
    assert counted == pytest.approx(list(layer_forward_flops(SMALL, microbatch)[1:]))


def test_a_block_stores_about_what_the_activation_formula_says():
    block = Block(_config(SMALL))
    meter = ActivationMeter(lambda: {parameter.untyped_storage().data_ptr() for parameter in block.parameters()})
    with meter.hooks():
        output = block(torch.randn(2, SMALL.block_size, SMALL.width, requires_grad=True))
    estimated = layer_activation_bytes(SMALL, 2, 4, "none")[1]
    assert 0.75 * estimated <= meter.current <= 1.25 * estimated, (meter.current, estimated)
    del output


def test_in_bf16_a_block_also_stores_its_weights_copy_as_the_planner_counts():
    from layerpipe.plan import cached_costs

    block = Block(_config(SMALL))
    meter = ActivationMeter(lambda: {parameter.untyped_storage().data_ptr() for parameter in block.parameters()})
    with meter.hooks(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = block(torch.randn(2, SMALL.block_size, SMALL.width, requires_grad=True))
    costs = cached_costs(SMALL, hardware_of(PlanRequest()), 1, SMALL.layers, 1, 2, ("none",) * SMALL.layers, 1)
    block_stage = costs.full_activation[1]  # one layer per stage: stage 1 is the first block
    assert 0.75 * block_stage <= meter.current <= 1.25 * block_stage, (meter.current, block_stage)
    del output


def _cost_file(path, processes=2, cores=2) -> str:
    cost = CostModel(
        forward_time=(0.003, 0.002, 0.002, 0.003),
        backward_time=(0.005, 0.004, 0.004, 0.005),
        optimizer_time=0.001,
        action_overhead=0.0002,
        p2p_latency=1e-4,
        p2p_bandwidth=3e9,
        boundary_bytes=131072.0,
        activation_bytes=2e6,
        weight_bytes=8e5,
        data_parallel_latency=3e-4,
        data_parallel_bandwidth=1e9,
    )
    about = {
        "processes": processes,
        "cores": cores,
        "model": "gpt",
        "ranks": 2,
        "stages_per_rank": 2,
        "microbatches": 8,
        "data_parallel": 1,
        "batch_size": 32,
        **dataclasses.asdict(MODELS["demo"]),
    }
    write_cost_file(str(path), cost, about)
    return str(path)


def test_the_search_finds_the_fastest_of_all_candidates(tmp_path):
    request = PlanRequest(
        model="demo",
        gpus=4,
        gpu_memory=1.0,
        global_batch=16,
        cost_file=_cost_file(tmp_path / "c.toml"),
        top=3,
        max_stages_per_rank=3,
    )
    result = plan(request)
    shape, hardware = model_shape("demo"), hardware_of(request)
    every = [evaluate(candidate, shape, hardware, math.inf) for candidate in candidates(request, shape)]
    fastest = min(entry.step_time for entry in every)
    assert min(entry.step_time for entry in result.best) == pytest.approx(fastest)
    assert result.best[0].step_time <= fastest * (1 + NEAR_TIE)
    assert sorted(entry.step_time for entry in result.best[1:]) == [entry.step_time for entry in result.best[1:]]
    assert result.simulated < len(every)


def test_the_configuration_picked_does_not_depend_on_how_many_are_shown(tmp_path):
    cost_file = _cost_file(tmp_path / "c.toml")
    picks = {
        plan(PlanRequest(model="demo", gpus=2, gpu_memory=1.0, global_batch=32, cost_file=cost_file, top=top, jobs=1))
        .best[0]
        .candidate
        for top in (1, 4, 10)
    }
    assert len(picks) == 1


def test_the_memory_floor_never_exceeds_the_peak():
    from layerpipe.plan import costs_of, memory_floor, memory_programs, peak_memory

    request = PlanRequest(model="demo", gpus=4, global_batch=16, max_stages_per_rank=2)
    shape, hardware = model_shape("demo"), hardware_of(request)
    for candidate in list(candidates(request, shape))[::7]:
        costs = costs_of(candidate, shape, hardware)
        peak = peak_memory(memory_programs(candidate.schedule), candidate.schedule, costs)
        assert memory_floor(candidate, costs) <= peak * (1 + 1e-12), candidate


def test_among_near_ties_the_simplest_configuration_comes_first():
    from layerpipe.plan import PlanEntry, simplest_first
    from layerpipe.schedule.config import ScheduleConfig

    def entry(time, **knobs):
        config = ScheduleConfig(ranks=2, microbatches=4, data_parallel=2, **knobs)
        return PlanEntry(Candidate(config, 1), time, 1 / time, 1.0, 0.0, 0.0)

    fastest, simple, slow = entry(1.00, zero=3), entry(1.02, zero=0, reduce_portions=1), entry(1.10, zero=0)
    assert simplest_first([fastest, simple, slow]) == (simple, fastest, slow)
    assert simplest_first([fastest, slow]) == (fastest, slow)


def test_what_does_not_fit_is_refused_and_zero_three_fits_where_zero_zero_does_not():
    shape, hardware = MODELS["gpt-52b"], hardware_of(PlanRequest(gpus=64))
    request = PlanRequest(model="gpt-52b", gpus=64, gpu_memory=80, global_batch=64)
    limit = 80 * GIB * USABLE_MEMORY
    entries = {}
    for candidate in candidates(request, shape):
        config = candidate.schedule
        if (
            config.schedule,
            config.ranks,
            config.stages_per_rank,
            config.microbatches,
            config.recompute,
            config.reduce_portions,
        ) == ("interleaved", 8, 8, 8, "full", 1):
            entries[config.zero] = evaluate(candidate, shape, hardware, limit)
    assert entries[0] is None and entries[3] is not None
    assert entries[3].memory <= limit


@pytest.mark.parametrize(
    "knobs",
    [
        dict(schedule="breadth-first", zero=3, recompute="full"),
        dict(schedule="interleaved", zero=2, recompute="selective", reduce_portions=4),
        dict(schedule="1f1b", stages_per_rank=1, zero=1),
        dict(schedule="zero-bubble", zero=3, weight_buffers=1),
    ],
)
def test_memory_is_checked_on_short_programs_with_the_answer_of_the_whole_ones(knobs):
    from layerpipe.plan import costs_of, memory_programs, peak_memory
    from layerpipe.schedule.build import build_schedule
    from layerpipe.schedule.config import ScheduleConfig

    config = ScheduleConfig(ranks=2, microbatches=4, data_parallel=2, **knobs)
    candidate = Candidate(config, 2)
    costs = costs_of(candidate, SMALL, hardware_of(PlanRequest()))
    whole = peak_memory(build_schedule(config).programs, config, costs)
    assert peak_memory(memory_programs(config), config, costs) == whole > 0


def test_the_plan_is_a_train_config_file_with_the_chosen_knobs(tmp_path):
    request = PlanRequest(
        model="demo", gpus=2, gpu_memory=1.0, global_batch=32, cost_file=_cost_file(tmp_path / "c.toml")
    )
    result = plan(request)
    path = tmp_path / "plan.toml"
    path.write_text(train_toml(result.best[0], result, request))
    config = config_from(build_parser().parse_args(["--config", str(path), "--output", str(tmp_path / "run")]))
    chosen = result.best[0].candidate.schedule  # the plan leaves clipping out: train's default (on) applies
    assert dataclasses.replace(config.pipeline, clip_grad_norm=chosen.clip_grad_norm) == chosen
    assert config.pipeline.clip_grad_norm == TrainConfig().pipeline.clip_grad_norm
    assert config.batch_size == 32 and config.processes == 2
    assert (config.gpt.width, config.gpt.blocks) == (MODELS["demo"].width, MODELS["demo"].blocks)


def test_plan_on_the_command_line_prints_the_best_and_writes_them(tmp_path, capsys):
    output = tmp_path / "plan.toml"
    assert (
        main(
            [
                "plan",
                "--model",
                "gpt-52b",
                "--gpus",
                "16",
                "--gpu-memory",
                "80",
                "--global-batch",
                "16",
                "--max-stages-per-rank",
                "4",
                "--top",
                "3",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "52.4-billion-parameter GPT" in out and "interleaved p=16 v=4 d=1 m=16 b=1" in out
    assert "ranks = " in output.read_text()


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--gpus", "0"], "--gpus 0: must be a whole number of at least 1"),
        (["--gpu-memory", "-1"], "--gpu-memory -1.0: must be a finite number above 0"),
        (["--model", "gpt-9000"], "--model gpt-9000: choose one of demo, gpt-52b, or give a TOML file"),
        (
            ["--model", "gpt-52b", "--gpus", "1", "--global-batch", "8"],
            "--gpu-memory 80.0: no configuration of a 52.4-billion-parameter GPT (64 blocks",
        ),
        (["--gpus", "7", "--global-batch", "5"], "--gpus 7: no layout of 7 devices runs the model"),
        (["--output", "plan.txt"], "--output plan.txt: must end in one of .toml"),
    ],
)
def test_bad_requests_get_one_line(arguments, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error, error
    assert not (tmp_path / "plan.toml").exists()


def test_a_cost_file_without_the_models_sizes_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "old.toml"
    write_cost_file(str(path), CostModel(forward_time=1e-3), {"processes": 2})
    assert main(["plan", "--cost-file", str(path), "--output", str(tmp_path / "p.toml")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "lacks" in error and "layerpipe calibrate" in error


def test_a_negative_figure_in_the_cost_file_is_refused_in_one_line(tmp_path, capsys):
    path = _cost_file(tmp_path / "c.toml")
    text = open(path).read().replace("optimizer_time = 0.001", "optimizer_time = -0.001")
    open(path, "w").write(text)
    assert main(["plan", "--cost-file", path, "--output", str(tmp_path / "p.toml")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "optimizer_time = -0.001" in error


def test_a_model_file_gives_the_sizes(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text("block_size = 128\nwidth = 256\nheads = 8\nblocks = 6\nvocab_size = 100\nsteps = 3\n")
    assert model_shape(str(path)) == GPTShape(100, 128, 256, 8, 6)
    path.write_text("width = 100\nheads = 8\n")
    with pytest.raises(ConfigError, match=r"heads .8. must divide its width .100."):
        model_shape(str(path))


def test_processes_sharing_cores_slow_each_other_by_the_share_of_the_step_they_compute(tmp_path):
    request = PlanRequest(
        model="demo",
        gpus=4,
        gpu_memory=1.0,
        global_batch=32,
        cost_file=_cost_file(tmp_path / "c.toml", processes=4, cores=2),
    )
    shape, shared = model_shape("demo"), hardware_of(request)
    own_cores = dataclasses.replace(shared, cores=None)

    def ratio(ranks: int, data_parallel: int) -> float:
        candidate = next(
            c
            for c in candidates(request, shape)
            if (
                c.schedule.schedule,
                c.schedule.ranks,
                c.schedule.data_parallel,
                c.schedule.microbatches,
                c.schedule.zero,
            )
            == ("gpipe", ranks, data_parallel, 1, 0)
            and c.schedule.recompute == "none"
        )
        return (
            evaluate(candidate, shape, shared, math.inf).step_time
            / evaluate(candidate, shape, own_cores, math.inf).step_time
        )

    assert 1.8 <= ratio(1, 4) <= 2.0  # four processes computing all the time on two cores: half speed
    assert ratio(2, 2) <= 1.1  # one micro-batch through two stages: half the processes compute at a time


def _hardware_before_and_after(tmp_path, about_lines: str):
    """Return the hardware of the test cost file, then of the same file with ``about_lines`` added to ``[about]``."""
    path = _cost_file(tmp_path / "c.toml")
    plain = hardware_of(PlanRequest(model="demo", gpus=2, gpu_memory=1.0, global_batch=32, cost_file=path))
    text = open(path).read().replace("[about]\n", f"[about]\n{about_lines}\n")
    open(path, "w").write(text)
    return plain, hardware_of(PlanRequest(model="demo", gpus=2, gpu_memory=1.0, global_batch=32, cost_file=path))


def test_the_planner_reads_the_calibrated_contention_as_a_faster_process_alone(tmp_path):
    plain, faster = _hardware_before_and_after(tmp_path, "contention = 1.5")
    assert faster.flops == pytest.approx(1.5 * plain.flops)


def test_the_compute_rate_between_measured_micro_batch_sizes_is_interpolated_in_log_scale():
    hardware = dataclasses.replace(PRESETS["a100"], rates=((1, 0.5), (4, 1.0), (16, 1.5)))
    assert hardware.rate_at(2) == pytest.approx(0.75)
    assert hardware.rate_at(8) == pytest.approx(1.25)
    assert (hardware.rate_at(1), hardware.rate_at(64)) == (0.5, 1.5)
    assert PRESETS["a100"].rate_at(3) == 1.0


def test_the_alone_forward_times_give_rates_relative_to_the_calibrated_micro_batch(tmp_path):
    path = _cost_file(tmp_path / "c.toml")  # batch 32 over 8 micro-batches: 4 sequences each
    text = (
        open(path)
        .read()
        .replace(
            "[about]\n",
            "[about]\nalone_sizes = [1, 2, 4, 8]\nalone_forward = [1.0, 1.0, 2.0, 2.0]\nsplit_backward = 1.5\n",
        )
    )
    open(path, "w").write(text)
    hardware = hardware_of(PlanRequest(model="demo", gpus=2, gpu_memory=1.0, global_batch=32, cost_file=path))
    assert hardware.rates == ((1, 0.5), (2, 1.0), (4, 1.0), (8, 2.0))
    assert hardware.split_backward == 1.5


def test_zero_bubble_pays_the_calibrated_price_of_splitting_its_backward(tmp_path):
    from layerpipe.plan import costs_of

    request = PlanRequest(
        model="demo", gpus=2, gpu_memory=1.0, global_batch=32, cost_file=_cost_file(tmp_path / "c.toml")
    )
    shape, hardware = model_shape("demo"), dataclasses.replace(hardware_of(request), split_backward=1.5)
    layout = {
        (c.schedule.schedule, c.schedule.microbatches, c.schedule.stages_per_rank): c
        for c in candidates(request, shape)
        if c.schedule.ranks == 2 and c.schedule.recompute == "none"
    }
    split, whole = (costs_of(layout[(name, 8, 1)], shape, hardware).cost for name in ("zero-bubble", "1f1b"))
    assert split.backward_time == pytest.approx(tuple(1.5 * time for time in whole.backward_time))
    assert split.forward_time == whole.forward_time


@pytest.mark.parametrize(
    "line, named",
    [
        ("alone_sizes = [2, 1]\nalone_forward = [1.0, 1.0]", "alone_sizes"),
        ("alone_sizes = [1, 2]\nalone_forward = [1.0]", "alone_sizes"),
        ("split_backward = 0.5", "split_backward = 0.5"),
        ("contention = 0.5", "contention = 0.5 must be a finite number of at least 1"),
    ],
)
def test_bad_calibrated_figures_are_refused_in_one_line(line, named, tmp_path, capsys):
    path = _cost_file(tmp_path / "c.toml")
    text = open(path).read().replace("[about]\n", f"[about]\n{line}\n")
    open(path, "w").write(text)
    assert main(["plan", "--cost-file", path, "--output", str(tmp_path / "p.toml")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error


def test_a_zero_bubble_calibration_holds_the_split_in_its_backward_already(tmp_path):
    plain, split = _hardware_before_and_after(tmp_path, 'schedule = "zero-bubble"\nsplit_backward = 1.5')
    assert split.backward_ratio == pytest.approx(plain.backward_ratio / 1.5) and split.split_backward == 1.5


def test_best_among_finds_the_fastest_of_the_candidates_it_is_given(tmp_path):
    from layerpipe.plan import best_among

    request = PlanRequest(
        model="demo", gpus=4, gpu_memory=1.0, global_batch=16, cost_file=_cost_file(tmp_path / "c.toml")
    )
    shape, hardware = model_shape("demo"), hardware_of(request)
    family = [c for c in candidates(request, shape) if c.schedule.schedule == "breadth-first"]
    fastest = min(evaluate(candidate, shape, hardware, math.inf).step_time for candidate in family)
    found = best_among(family, shape, hardware, math.inf, jobs=1)
    assert [entry.step_time for entry in found] == [pytest.approx(fastest)]
    assert found[0].candidate.schedule.schedule == "breadth-first"
    assert best_among([], shape, hardware, math.inf) == []


def test_the_planner_searches_every_schedule_on_the_v_shape_at_two_stages_a_rank():
    from layerpipe.plan import best_among, describe
    from layerpipe.schedule.registry import names_where

    request = PlanRequest(model="demo", gpus=4, gpu_memory=1.0, global_batch=16)
    shape, hardware = model_shape("demo"), hardware_of(request)
    on_the_v = [c for c in candidates(request, shape) if c.schedule.placement_name == "vshape"]
    assert {c.schedule.schedule for c in on_the_v} == set(names_where(lambda record: "vshape" in record.placements))
    assert {"zb-v", "v-half", "v-min"} <= {c.schedule.schedule for c in on_the_v}
    assert {c.schedule.stages_per_rank for c in on_the_v} == {2}
    for name in ("zb-v", "v-half", "v-min", "breadth-first"):
        found = best_among([c for c in on_the_v if c.schedule.schedule == name], shape, hardware, math.inf, jobs=1)
        assert found and found[0].candidate.schedule.schedule == name
    breadth_first = next(c for c in on_the_v if c.schedule.schedule == "breadth-first")
    assert "placement=vshape" in describe(best_among([breadth_first], shape, hardware, math.inf, jobs=1)[0])
