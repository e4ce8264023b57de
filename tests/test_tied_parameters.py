"""Parameters tied across stages train as the one shared ``nn.Parameter`` of a single process.

A model whose first layer's weight is used again by its last layer (as a
language model's embedding and head), pipelined so that the two uses land on
different stages: every holder keeps a copy, the program's ``TIE`` sums their
gradients once per step, and the global gradient norm counts the weight once.
Shown in float64 against one process running the same layers (one shared
parameter, ``torch.nn.utils.clip_grad_norm_``, SGD with momentum), with the
clip limit below the norm so that every step clips: losses, ``last_grad_norm``
and every parameter after several steps, for every flushed schedule on 2 ranks,
the V-shape placement, recomputation, two ties whose stages overlap (one group,
some ranks without a copy of one of its parameters), 4 ranks and 2 ranks × 2
replicas at ZeRO 0–3 — one launch per process count.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from runtime_models import Chain, batch, relative_error
from safetensors import safe_open
from test_clipping import flushed_cases
from torch import nn

import layerpipe
from layerpipe.checkpoint_files import CheckpointError
from layerpipe.runtime.checkpoint import load_checkpoint, load_weights, save_checkpoint
from layerpipe.schedule.actions import Kind
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ConfigError, ScheduleConfig
from layerpipe.schedule.ties import merge_ties
from layerpipe.sim.cost import CostModel
from layerpipe.sim.simulator import simulate
from layerpipe.viz.gantt import LABELS, draw_timeline

STEPS, SAMPLES, LIMIT, TOLERANCE = 3, 8, 0.05, 1e-10


class TiedHead(nn.Module):
    """Uses another layer's weight (shape ``(hidden, width)``): ``x @ weight``, then a linear map of its own."""

    def __init__(self, weight: nn.Parameter, out: int):
        super().__init__()
        self.weight = weight
        self.out = nn.Linear(weight.shape[1], out)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.weight))


def tied_layers(seed: int = 0) -> list[nn.Module]:
    """Return ten float64 layers; the first one's weight is used again by the last."""
    torch.manual_seed(seed)
    first = nn.Linear(6, 4)
    middle = [nn.Tanh(), nn.Linear(4, 7), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 6), nn.Linear(6, 5)]
    middle += [nn.Linear(5, 4), nn.Linear(4, 4)]
    return [layer.double() for layer in [first, *middle]] + [TiedHead(first.weight, 3).double()]


class Uses(nn.Module):
    """``tanh(x @ w.T)`` for each of the given weights (held, not copied) in turn, plus a bias of its own; then
    ``out`` when given."""

    def __init__(self, weights: list[nn.Parameter], out: nn.Module | None = None):
        super().__init__()
        self.weights = nn.ParameterList(weights)
        self.bias = nn.Parameter(torch.zeros(weights[-1].shape[0], dtype=weights[-1].dtype))
        self.out = out

    def forward(self, x):
        for weight in self.weights:
            x = torch.tanh(x @ weight.T)
        x = x + self.bias
        return x if self.out is None else self.out(x)


def overlapping_layers() -> list[nn.Module]:
    """Return four float64 layers, one per stage: A's weight is held by stages 0, 2 and 3, B's by 1 and 3 (one tie
    group of all four stages, some of whose ranks hold no copy of B)."""
    torch.manual_seed(1)
    first, second = nn.Linear(6, 6).double(), nn.Linear(6, 6).double()
    return [first, second, Uses([first.weight]), Uses([first.weight, second.weight], nn.Linear(6, 3).double())]


MODELS = {"head": tied_layers, "overlapping": overlapping_layers}
"""The tied models the equality tests train, by name (a worker builds its own from the name)."""


def optimizer(parameters):
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9)


def reference(steps: int = STEPS, name: str = "head") -> tuple[list, list, dict]:
    """Return the losses, clip norms and final parameters (every ``state_dict`` name) of one process running
    ``MODELS[name]``."""
    model = Chain(*copy.deepcopy(MODELS[name]()))
    sgd = optimizer(model.parameters())
    losses, norms = [], []
    for step in range(steps):
        inputs, targets = batch(SAMPLES, seed=step + 1)
        sgd.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), LIMIT)))
        losses.append(float(loss.detach()))
        sgd.step()
    return losses, norms, {name: value.clone() for name, value in model.state_dict().items()}


def run_cases(cases: list[dict]) -> list[tuple]:
    """Worker: train every case with clipping; return per case the losses, norms, weights and the tie groups."""
    results = []
    for options in cases:
        options = {"microbatches": 4, **options}  # dualpipe-v's cases ask for the 2p it needs
        layers = MODELS[options.pop("model", "head")]()
        pipe = layerpipe.Pipeline(
            layers, nn.functional.mse_loss, clip_grad_norm=LIMIT, timeout=60, optimizer=optimizer, **options,
        )  # fmt: skip
        losses, norms = [], []
        for step in range(STEPS):
            losses.append(pipe.train_step(*batch(SAMPLES, seed=step + 1)))
            norms.append(pipe.last_grad_norm)
        momentum = {
            name: state["momentum_buffer"]
            for name, state in pipe.optimizer_state_dict()["state"].items()
            if name in ("0.weight", "9.weight")
        }
        results.append((losses, norms, pipe.gathered_state_dict(), pipe.schedule.config.ties, momentum))
        pipe.close()  # its gloo groups' threads would outlive it
    return results


def check(processes: int, cases: list[dict]) -> None:
    """Run ``cases`` on ``processes`` processes and compare each with the single-process reference of its model."""
    references = {name: reference(name=name) for name in {case.get("model", "head") for case in cases}}
    assert all(min(norms) > 4 * LIMIT for _, norms, _ in references.values()), "every step clips"
    per_process = layerpipe.launch(run_cases, processes, (cases,), timeout=600)
    for index, case in enumerate(cases):
        rows = [results[index] for results in per_process]
        losses, norms, parameters = references[case.get("model", "head")]
        groups = ((0, 1, 2, 3),) if "model" in case else ((0, rows[0][3][0][-1]),)
        assert rows[0][3] == groups, f"{case}: tie groups {rows[0][3]}"
        assert len({tuple(row[1]) for row in rows}) == 1, f"{case}: the same norm, to the bit, on every process"
        momentum = {name: value for row in rows for name, value in row[4].items()}
        if "model" not in case:
            assert torch.equal(momentum["0.weight"], momentum["9.weight"]), f"{case}: the copies' optimizer states"
        for found_losses, found_norms, state, _, _ in rows:
            for found, expected in zip(found_losses + found_norms, losses + norms):
                assert abs(found - expected) <= TOLERANCE * abs(expected), f"{case}: {found} != {expected}"
            for name, value in state.items():
                error = relative_error(value, parameters[name])
                assert error <= TOLERANCE, f"{case}: {name} off by {error:.1e}"
        assert {name for row in rows for name in row[2]} == set(parameters), f"{case}: every parameter compared"


@pytest.mark.multiprocess
def test_two_ranks_train_a_tied_weight_as_one_process_for_every_schedule_the_vshape_and_recomputation():
    cases = flushed_cases(2) + [
        dict(schedule="breadth-first", placement="vshape"),
        dict(schedule="breadth-first", recompute="full"),
        dict(schedule="1f1b", recompute="selective"),
        dict(model="overlapping", schedule="breadth-first", partition=[0, 1, 2, 3]),
        dict(model="overlapping", schedule="zb-v", partition=[0, 1, 2, 3]),
    ]
    check(2, cases)


@pytest.mark.multiprocess
def test_four_ranks_and_two_replicas_at_every_zero_level_train_a_tied_weight_as_one_process():
    four = flushed_cases(4)  # every flushed schedule of the registry
    replicated = [dict(schedule="breadth-first", data_parallel=2, zero=zero) for zero in range(4)]
    check(4, four + replicated + [dict(schedule="1f1b", data_parallel=2, zero=3, reduce_portions=2)])


def test_the_tie_sum_comes_after_every_backward_and_before_the_holders_reduces_and_the_clip():
    config = ScheduleConfig("breadth-first", ranks=2, microbatches=4, data_parallel=2, zero=2, ties=((0, 3),))
    programs = build_schedule(dataclasses.replace(config, clip_grad_norm=1.0)).programs
    for program in programs:
        kinds = [action.kind for action in program]
        tie = kinds.index(Kind.TIE)
        assert program[tie].stage == 0, "written with the group's first stage on every holding rank"
        assert max(i for i, kind in enumerate(kinds) if kind in (Kind.B, Kind.I, Kind.W)) < tie
        holders = [i for i, a in enumerate(program) if a.kind is Kind.REDUCE and a.stage in (0, 3)]
        assert holders and min(holders) > tie and kinds.index(Kind.CLIP) > max(holders)
    untied = build_schedule(dataclasses.replace(config, ties=())).programs
    assert all(Kind.TIE not in [action.kind for action in program] for program in untied)


def test_the_simulator_charges_the_tie_sum_across_ranks_and_nothing_on_one_rank():
    cost = CostModel(forward_time=1.0, backward_time=2.0, tie_bytes=100.0, p2p_bandwidth=10.0)
    for name, placement, extra in (("breadth-first", "looping", 10.0), ("zb-v", "vshape", 0.0)):
        config = ScheduleConfig(name, ranks=2, microbatches=4, placement=placement)
        plain = simulate(build_schedule(config), cost)
        tied = simulate(build_schedule(dataclasses.replace(config, ties=((0, 3),))), cost)
        assert tied.step_time == pytest.approx(plain.step_time + extra), name  # 100 bytes, all-reduce over 2
        drawn = [event for event in tied.timeline.events if event[2].kind is Kind.TIE]
        assert len(drawn) == (2 if placement == "looping" else 1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    draw_timeline(axes, tied.timeline)
    labels = set(axes.get_legend_handles_labels()[1])
    plt.close(figure)
    assert LABELS["TIE"] in labels, "the pictures draw it"


def test_async_and_early_steps_refuse_tied_parameters_in_one_line():
    with pytest.raises(ConfigError, match="async updates each stage on its own, so the copies"):
        build_schedule(ScheduleConfig("async", ranks=2, microbatches=4, ties=((0, 1),)))
    with pytest.raises(ConfigError, match=r"^step_placement='early': a parameter tied across stages"):
        build_schedule(ScheduleConfig("1f1b", ranks=2, microbatches=4, step_placement="early", ties=((0, 1),)))


def untied_layers() -> list[nn.Module]:
    """Return ``tied_layers()`` with the last layer holding a weight of its own, of other values (same names)."""
    layers = tied_layers()
    layers[-1].weight = nn.Parameter(layers[0].weight.detach() + 1.0)
    return layers


def _pipe(layers, schedule: str, **options):
    return layerpipe.Pipeline(
        layers, nn.functional.mse_loss, schedule=schedule, microbatches=4, clip_grad_norm=LIMIT, timeout=60,
        optimizer=optimizer, **options,
    )  # fmt: skip


def save_resume_refuse(folder: str, untied_folder: str) -> tuple:
    """Worker: train 2 steps on 1f1b, save, train a third; load the checkpoint into the V-shape (both holders on
    one rank) and train the third step there; return both states and the refusals of disagreeing copies."""
    pipe = _pipe(tied_layers(), "1f1b")
    for step in range(2):
        pipe.train_step(*batch(SAMPLES, seed=step + 1))
    save_checkpoint(pipe, folder, {"step": 2})
    pipe.train_step(*batch(SAMPLES, seed=3))
    straight = pipe.gathered_state_dict()
    resumed = _pipe(tied_layers(seed=5), "zb-v")
    load_checkpoint(resumed, folder)
    resumed.train_step(*batch(SAMPLES, seed=3))
    save_checkpoint(_pipe(untied_layers(), "1f1b"), untied_folder, {"step": 0})
    refusals = []
    for attempt in (lambda: load_checkpoint(_pipe(tied_layers(), "1f1b"), untied_folder),
                    lambda: _pipe(tied_layers(), "1f1b").load_state_dict(nn.Sequential(*untied_layers()).state_dict())):  # fmt: skip
        try:
            attempt()
            refusals.append(None)
        except (CheckpointError, ValueError) as error:
            refusals.append(str(error))
    return straight, resumed.gathered_state_dict(), refusals


@pytest.mark.multiprocess
def test_a_checkpoint_stores_a_tied_weight_once_loads_it_into_every_holder_and_refuses_copies_that_disagree(tmp_path):
    folder, untied = str(tmp_path / "tied"), str(tmp_path / "untied")
    per_process = layerpipe.launch(save_resume_refuse, 2, (folder, untied), timeout=300)
    straight = {name: value for row in per_process for name, value in row[0].items()}
    resumed = {name: value for row in per_process for name, value in row[1].items()}
    assert set(straight) == set(resumed) == set(nn.Sequential(*tied_layers()).state_dict())
    for name, value in straight.items():
        assert relative_error(resumed[name], value) <= TOLERANCE, name
    keys = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                keys.update(handle.keys())
    assert "model.0.weight" in keys and "model.9.weight" not in keys, "stored once, under its first name"
    assert not any(key.startswith("optimizer.9.weight.") for key in keys)
    weights = load_weights(folder)
    assert torch.equal(weights["0.weight"], weights["9.weight"])
    model = nn.Sequential(*tied_layers(seed=7))
    model.load_state_dict(weights)  # every name nn.Sequential lists
    message = "one parameter tied across stages 0, 1, different values: give both names one value"
    for refusal in per_process[0][2]:
        assert refusal is not None and len(refusal.splitlines()) == 1 and refusal.endswith(message), per_process[0][2]


def float32_reference(autocast_dtype: torch.dtype) -> tuple[list, dict]:
    """Return the losses and final state of one process running the float32 tied model under ``autocast_dtype``."""
    model = Chain(*[layer.float() for layer in copy.deepcopy(tied_layers())])
    sgd = optimizer(model.parameters())
    losses = []
    for step in range(STEPS):
        inputs, targets = (t.float() for t in batch(SAMPLES, seed=step + 1))
        sgd.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype):
            loss = nn.functional.mse_loss(model(inputs).float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), LIMIT)
        losses.append(float(loss.detach()))
        sgd.step()
    return losses, {name: value.clone() for name, value in model.state_dict().items()}


def half_precision_runs() -> list[tuple]:
    """Worker: train the float32 tied model in bfloat16 and in float16 (loss scaling, guard) with clipping."""
    results = []
    for precision in ("bf16", "fp16"):
        pipe = _pipe(
            [layer.float() for layer in tied_layers()], "1f1b", precision=precision, skip_nonfinite=precision == "fp16"
        )
        losses = [pipe.train_step(*(t.float() for t in batch(SAMPLES, seed=step + 1))) for step in range(STEPS)]
        results.append((losses, pipe.gathered_state_dict()))
    return results


@pytest.mark.multiprocess
def test_half_precision_keeps_the_tied_copies_equal_and_updates_them_as_one_process_within_its_rounding():
    per_process = layerpipe.launch(half_precision_runs, 2, timeout=300)
    for index, dtype in enumerate((torch.bfloat16, torch.float16)):
        losses, expected = float32_reference(dtype)
        first, last = per_process[0][index], per_process[1][index]
        assert torch.equal(first[1]["0.weight"], last[1]["9.weight"]), f"{dtype}: the copies are one to the bit"
        for found, wanted in zip(last[0], losses):
            assert abs(found - wanted) <= 1e-2 * abs(wanted), f"{dtype}: loss {found} != {wanted}"
        initial = tied_layers()[0].weight.float()
        error = relative_error(first[1]["0.weight"] - initial, expected["0.weight"] - initial)
        assert error <= (5e-2 if dtype is torch.bfloat16 else 1e-2), (
            f"{dtype}: the tied weight's update off by {error:.1e}"
        )


def test_ties_whose_stages_overlap_are_one_group_named_by_its_first_stage():
    assert merge_ties([(3, 0), (2, 5), (5, 3), (1,), (4, 6)]) == ((0, 2, 3, 5), (4, 6))
    with pytest.raises(ConfigError, match="must be disjoint sorted groups"):
        build_schedule(ScheduleConfig("1f1b", ranks=2, microbatches=4, ties=((1, 0),)))
