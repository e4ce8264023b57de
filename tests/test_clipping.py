"""Global gradient-norm clipping equals ``torch.nn.utils.clip_grad_norm_`` on the whole model in one process.

``clip_grad_norm`` puts a ``CLIP`` before each rank's first ``STEP``: one
all-reduce of per-stage squared norms over every process (which guards
too), then every stage scales its gradients.  Shown in float64 against a
single-process reference, with the limit far below the norm so that every
step clips: every flushed schedule on 2 and 4 ranks, the V-shape placement,
recomputation, 2 ranks x 2 replicas at ZeRO 0-3 and 2 ranks x 2 spatial
bands; float16 is unscaled before it clips.  One launch per
process count builds every case's ``Pipeline`` in turn.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_models import Chain, batch, mlp_layers, relative_error
from test_spatial_pipeline import images, plain_layers, spatial_layers
from torch import nn

import layerpipe
from layerpipe.checkpoint_files import latest_checkpoint
from layerpipe.runtime.checkpoint import load_weights
from layerpipe.schedule.actions import Kind
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import SCHEDULES, ConfigError, ScheduleConfig
from layerpipe.schedule.registry import schedule_record
from layerpipe.sim.cost import CostModel
from layerpipe.sim.simulator import simulate
from layerpipe.train.config import build_parser, config_from
from layerpipe.viz.gantt import LABELS, draw_timeline

STEPS, SAMPLES, LIMIT, TOLERANCE = 3, 8, 0.05, 1e-10
FLUSHED = tuple(name for name in SCHEDULES if not schedule_record(name).streams)


def _optimizer(parameters):
    """SGD with momentum: the update is proportional to the clipped gradient, so a wrong clip shows at once."""
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)


def clipped_reference(steps: int = STEPS) -> tuple[list, list, dict]:
    """Return the losses, the norms ``clip_grad_norm_`` returned and the final parameters of one process."""
    model = Chain(*copy.deepcopy(mlp_layers()))
    optimizer = _optimizer(model.parameters())
    losses, norms = [], []
    for step in range(steps):
        inputs, targets = batch(SAMPLES, seed=step + 1)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), LIMIT)))
        losses.append(float(loss.detach()))
        optimizer.step()
    return losses, norms, {name: p.detach().clone() for name, p in model.named_parameters()}


def flushed_cases(ranks: int) -> list[dict]:
    """Return every flushed schedule on ``ranks`` ranks with its default stages per rank (dualpipe-v with the 2p
    micro-batches it needs where ``run_cases``'s four are too few)."""
    cases = [
        dict(schedule=name, group_size=ranks) if "group_size" in schedule_record(name).options else dict(schedule=name)
        for name in FLUSHED
    ]
    return [dict(case, microbatches=2 * ranks) if case["schedule"] == "dualpipe-v" else case for case in cases]


def run_cases(cases: list[dict]) -> list[tuple]:
    """Worker: train every case ``STEPS`` steps with clipping; return per case the losses, norms and final weights."""
    results = []
    for options in cases:
        pipe = layerpipe.Pipeline(
            mlp_layers(), nn.functional.mse_loss, clip_grad_norm=LIMIT, timeout=60, optimizer=_optimizer,
            **{"microbatches": 4, **options},
        )  # fmt: skip
        losses, norms = [], []
        for step in range(STEPS):
            losses.append(pipe.train_step(*batch(SAMPLES, seed=step + 1)))
            norms.append(pipe.last_grad_norm)
        results.append((losses, norms, pipe.gathered_state_dict()))
        pipe.close()  # its gloo groups' threads would outlive it
    return results


def check(processes: int, cases: list[dict]) -> None:
    """Run ``cases`` on ``processes`` processes and compare each with the clipped single-process reference."""
    losses, norms, parameters = clipped_reference()
    assert min(norms) > 4 * LIMIT, "every step clips"
    per_process = layerpipe.launch(run_cases, processes, (cases,), timeout=300)
    for index, case in enumerate(cases):
        rows = [results[index] for results in per_process]
        assert len({tuple(row[1]) for row in rows}) == 1, f"{case}: the same norm, to the bit, on every process"
        for found_losses, found_norms, state in rows:
            for found, expected in zip(found_losses + found_norms, losses + norms):
                assert abs(found - expected) <= TOLERANCE * abs(expected), f"{case}: {found} != {expected}"
            for name, value in state.items():
                error = relative_error(value, parameters[name])
                assert error <= TOLERANCE, f"{case}: {name} off by {error:.1e}"
        assert {name for row in rows for name in row[2]} == set(parameters), f"{case}: every parameter compared"


@pytest.mark.multiprocess
def test_two_ranks_clip_as_one_process_for_every_schedule_the_vshape_and_recomputation():
    cases = flushed_cases(2) + [
        dict(schedule="breadth-first", placement="vshape"),
        dict(schedule="breadth-first", recompute="full"),
        dict(schedule="1f1b", recompute="selective"),
    ]
    check(2, cases)


@pytest.mark.multiprocess
def test_four_ranks_and_two_replicas_at_every_zero_level_clip_as_one_process():
    replicated = [dict(schedule="breadth-first", data_parallel=2, zero=zero) for zero in range(4)]
    check(4, flushed_cases(4) + replicated + [dict(schedule="1f1b", data_parallel=2, zero=2, reduce_portions=2)])


def poisoned_steps() -> list[tuple]:
    """Worker: three clipped steps, the second with NaN gradients on rank 1 only; return what each step did."""
    pipe = layerpipe.Pipeline(
        mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=2, clip_grad_norm=LIMIT, timeout=60,
        optimizer=_optimizer,
    )  # fmt: skip
    seen = []
    for step in range(3):
        handle = None
        if step == 1 and pipe.rank == 1:
            parameter = next(iter(pipe.stages.values())).layers[0].weight
            handle = parameter.register_hook(lambda gradient: gradient * float("nan"))
        before = {name: value.detach().clone() for name, value in pipe.named_parameters()}
        pipe.train_step(*batch(SAMPLES, seed=step + 1))
        unchanged = all(torch.equal(before[name], value) for name, value in pipe.named_parameters())
        seen.append((pipe.last_step_skipped, pipe.last_grad_norm, unchanged))
        if handle is not None:
            handle.remove()
    return seen


@pytest.mark.multiprocess
def test_a_norm_that_is_not_finite_skips_the_step_on_every_rank():
    for clean, poisoned, after in layerpipe.launch(poisoned_steps, 2, timeout=120):
        assert clean[0] is None and math.isfinite(clean[1]) and not clean[2]
        assert poisoned[0] == 1 and math.isnan(poisoned[1]) and poisoned[2], "skipped, naming stage 1, NaN norm"
        assert after[0] is None and math.isfinite(after[1]) and not after[2], "training goes on"


def test_the_clip_replaces_the_guard_before_each_ranks_first_step():
    for guarded in (False, True):
        config = ScheduleConfig("breadth-first", ranks=2, microbatches=4, clip_grad_norm=1.0, skip_nonfinite=guarded)
        for program in build_schedule(config).programs:
            kinds = [action.kind for action in program]
            assert Kind.GUARD not in kinds, "one all-reduce: the clip carries the guard's agreement"
            assert kinds.count(Kind.CLIP) == 1 and kinds[kinds.index(Kind.CLIP) + 1] is Kind.STEP
            assert Kind.STEP not in kinds[: kinds.index(Kind.CLIP)]


def test_without_clipping_the_programs_are_unchanged():
    plain = build_schedule(ScheduleConfig("breadth-first", ranks=2, microbatches=4, skip_nonfinite=True))
    assert not any(action.kind is Kind.CLIP for program in plain.programs for action in program)


def test_the_simulator_charges_the_clip_and_draws_it():
    cost = CostModel(p2p_latency=0.5, clip_time=0.25)
    options = dict(ranks=2, microbatches=4)
    plain = simulate(build_schedule(ScheduleConfig("breadth-first", **options)), cost)
    clipped = simulate(build_schedule(ScheduleConfig("breadth-first", clip_grad_norm=1.0, **options)), cost)
    assert clipped.step_time == pytest.approx(plain.step_time + 0.5 + 2 * 0.25), "latency and v = 2 stages' work"
    clips = [event for event in clipped.timeline.events if event[2].kind is Kind.CLIP]
    assert len(clips) == 2 and all(event[1] == "compute" for event in clips)
    assert min(end - start for _, _, _, start, end in clips) == pytest.approx(1.0), "the last to arrive waits for none"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    draw_timeline(axes, clipped.timeline)
    labels = set(axes.get_legend_handles_labels()[1])
    plt.close(figure)
    assert LABELS["CLIP"] in labels, "the pictures draw it"


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_limit_is_refused_in_one_line_before_anything_runs(value, tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_schedule(ScheduleConfig("1f1b", ranks=2, microbatches=2, clip_grad_norm=value))
    assert str(caught.value) == f"clip_grad_norm={value!r}: must be a finite number above 0"
    output = tmp_path / "run"
    arguments = build_parser().parse_args(["--clip-grad-norm", str(value), "--output", str(output)])
    with pytest.raises(ConfigError) as caught:
        config_from(arguments)
    assert str(caught.value) == f"--clip-grad-norm {value}: must be a finite number above 0"
    assert "\n" not in str(caught.value) and not output.exists(), "one line, nothing written"


def test_async_and_early_steps_refuse_clipping_in_one_line():
    with pytest.raises(ConfigError, match=r"^clip_grad_norm=1.0: async updates each stage on its own"):
        build_schedule(ScheduleConfig("async", ranks=2, microbatches=4, clip_grad_norm=1.0))
    with pytest.raises(ConfigError, match=r"^step_placement='early': clip_grad_norm needs the whole model"):
        build_schedule(ScheduleConfig("1f1b", ranks=2, microbatches=4, clip_grad_norm=1.0, step_placement="early"))


def clipped_spatial_reference() -> tuple[list, dict]:
    """Return the norms ``clip_grad_norm_`` returned and the final parameters of the spatial test's plain model."""
    model = Chain(*plain_layers())
    optimizer = _optimizer(model.parameters())
    norms = []
    for step in range(STEPS):
        inputs, targets = images(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), LIMIT)))
        optimizer.step()
    return norms, {name: p.detach().clone() for name, p in model.named_parameters()}


def spatial_and_half_precision() -> tuple:
    """Worker on 4 processes: clipped spatial bands (2 ranks x 2 bands), then float16 on 4 ranks with an overflow."""
    pipe = layerpipe.Pipeline(
        spatial_layers(), nn.functional.mse_loss, microbatches=2, spatial=2, clip_grad_norm=LIMIT, timeout=60,
        optimizer=_optimizer,
    )  # fmt: skip
    norms = []
    for step in range(STEPS):
        pipe.train_step(*images(step))
        norms.append(pipe.last_grad_norm)
    spatial = (norms, {name: p.detach().clone() for name, p in pipe.named_parameters()})
    half = layerpipe.Pipeline(
        [layer.float() for layer in mlp_layers()], nn.functional.mse_loss, schedule="1f1b", microbatches=4,
        precision="fp16", skip_nonfinite=True, clip_grad_norm=LIMIT, timeout=60, optimizer=_optimizer,
    )  # fmt: skip
    seen = []
    for step in range(STEPS):
        handle = None
        if step == 1 and half.rank == 0:
            parameter = next(iter(half.stages.values())).layers[0].weight
            handle = parameter.register_hook(lambda gradient: gradient * float("inf"))
        inputs, targets = batch(SAMPLES, seed=step + 1)
        half.train_step(inputs.float(), targets.float())
        seen.append((half.last_grad_norm, half.last_step_skipped, half.loss_scale))
        if handle is not None:
            handle.remove()
    return spatial, seen


@pytest.mark.multiprocess
def test_spatial_bands_count_once_and_float16_unscales_before_it_clips():
    spatial_norms, spatial_parameters = clipped_spatial_reference()
    _, norms, _ = clipped_reference()
    for (found_norms, parameters), half in layerpipe.launch(spatial_and_half_precision, 4, timeout=300):
        for found, expected in zip(found_norms, spatial_norms):
            assert abs(found - expected) <= TOLERANCE * expected, f"spatial norm {found} != {expected}"
        assert all(relative_error(value, spatial_parameters[name]) <= TOLERANCE for name, value in parameters.items())
        (first, _, scale), (overflowed, skipped, halved), (after, _, _) = half
        assert abs(first - norms[0]) <= 1e-2 * norms[0], "the float16 norm is the unscaled one"
        assert skipped == 0 and not math.isfinite(overflowed) and halved == scale / 2, (
            "an overflow skips and halves the scale"
        )
        assert math.isfinite(after)


def _train(output, *options, environment=None):
    """Run ``layerpipe train`` small, with clipping unless ``options`` turn it off; return the finished process."""
    small = "--width 32 --heads 2 --blocks 2 --block-size 32 --batch-size 16 --microbatches 4 --sample-length 20"
    command = [sys.executable, "-m", "layerpipe.cli", "train", *small.split(), *options, "--output", str(output)]
    env = {**os.environ, **(environment or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.multiprocess
def test_train_reports_one_gradient_norm_per_step_and_a_resumed_run_keeps_them(tmp_path):
    """With warm-up, the cosine schedule, clipping and the embedding tied to the head: killed after a checkpoint and
    resumed, the run ends bit for bit as the straight run (losses, norms and every weight)."""
    options = ("--steps", "4", "--checkpoint-every", "2", "--clip-grad-norm", "0.5", "--warmup-steps", "2")
    options += ("--tie-embeddings",)
    assert _train(tmp_path / "straight", *options).returncode == 0
    killed = _train(tmp_path / "killed", *options, environment={"LAYERPIPE_KILL_AT": "1:3"})
    assert killed.returncode == 1 and "signal 9" in killed.stderr, killed.stderr[-2000:]
    resumed = _train(tmp_path / "killed", *options, "--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight, again = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("straight", "killed"))
    assert len(straight["grad_norms"]) == 4 and all(norm > 0 for norm in straight["grad_norms"])
    assert again["grad_norms"] == straight["grad_norms"] and again["losses"] == straight["losses"]
    weights, reference = (
        load_weights(latest_checkpoint(str(tmp_path / name / "checkpoints"))) for name in ("killed", "straight")
    )
    assert set(weights) == set(reference) and all(torch.equal(weights[name], reference[name]) for name in reference)
    tied = json.loads((Path(latest_checkpoint(str(tmp_path / "straight" / "checkpoints"))) / "tied.json").read_text())
    assert tied == {"3.linear.weight": "0.tokens.weight"}, "the head's weight is the embedding's, stored once"
    assert _train(tmp_path / "plain", "--steps", "1", "--clip-grad-norm", "none").returncode == 0  # on by default
    assert "grad_norms" not in json.loads((tmp_path / "plain" / "summary.json").read_text()), "no norm without clipping"


BAD_LIMITS = (0.0, -1.0, float("nan"), float("inf"))


def refusals() -> list[str]:
    """Worker: what ``Pipeline`` says to each bad limit."""
    said = []
    for value in BAD_LIMITS:
        try:
            layerpipe.Pipeline(mlp_layers(), nn.functional.mse_loss, "1f1b", microbatches=2, clip_grad_norm=value)
            said.append("accepted")
        except ConfigError as error:
            said.append(str(error))
    return said


@pytest.mark.multiprocess
def test_pipeline_refuses_a_bad_limit_in_one_line():
    said = layerpipe.launch(refusals, 1, timeout=120)[0]
    assert said == [f"clip_grad_norm={value!r}: must be a finite number above 0" for value in BAD_LIMITS]
