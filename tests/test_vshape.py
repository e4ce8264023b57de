"""The V-shape schedules (zb-v, v-half, v-min): refusals, float64 equality with the reference, unit-cost claims.

dualpipe-v, the fourth schedule on the V alone, has its own tests (``test_dualpipe.py``).

Their orders against torch's are in ``test_generators.py``; the whole-suite
equivalence tests cover them too (their schedule lists are read from the
registry), and here they run alone with enough micro-batches to fill the V
(``2p - 1`` and more).
"""

from __future__ import annotations

import itertools

import pytest
from runtime_models import batch, wide_layers
from test_data_parallel import check_results
from test_data_parallel import run_configurations as run_data_parallel
from test_runtime_equivalence import check
from torch import nn

import layerpipe
from layerpipe.schedule import vshape
from layerpipe.schedule.actions import Kind
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ConfigError, ScheduleConfig, validate_config
from layerpipe.schedule.placement import vshape as vshape_placement
from layerpipe.schedule.registry import names_where
from layerpipe.sim.cost import CostModel
from layerpipe.sim.memory import activation_peak
from layerpipe.sim.simulator import simulate

V_SCHEDULES = names_where(lambda record: record.placements == ("vshape",) and record.name != "dualpipe-v")


def test_the_v_schedules_are_registered_on_the_vshape_placement():
    assert names_where(lambda record: record.placements == ("vshape",)) == (*V_SCHEDULES, "dualpipe-v")
    assert V_SCHEDULES == ("zb-v", "v-half", "v-min")
    for name in (*V_SCHEDULES, "dualpipe-v"):
        config = validate_config(ScheduleConfig(name, ranks=3, microbatches=6))
        assert config.stages_per_rank == 2 and config.placement_name == "vshape"


@pytest.mark.parametrize("name", V_SCHEDULES)
@pytest.mark.parametrize("stages_per_rank", [1, 3])
def test_stages_per_rank_other_than_two_is_refused_in_one_line(name, stages_per_rank):
    with pytest.raises(ConfigError) as error:
        validate_config(ScheduleConfig(name, ranks=2, microbatches=4, stages_per_rank=stages_per_rank))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"stages_per_rank={stages_per_rank}: {name} puts two stages on each rank in a V")


@pytest.mark.parametrize("name", V_SCHEDULES)
@pytest.mark.parametrize("placement", ["looping", "contiguous"])
def test_a_placement_other_than_the_v_is_refused(name, placement):
    with pytest.raises(ConfigError, match=f"^placement='{placement}': {name} runs on the vshape placement$"):
        validate_config(ScheduleConfig(name, ranks=2, microbatches=4, placement=placement))


@pytest.mark.multiprocess
@pytest.mark.parametrize("ranks", [2, 4])
def test_v_schedules_match_the_single_process_reference(ranks):
    """Losses, gradients and parameters after three AdamW steps, with the V filled and with more micro-batches."""
    microbatch_counts = (2 * ranks - 1, 2 * ranks, 3 * ranks)
    cases = [(name, 2, m, None, "mlp") for name in V_SCHEDULES for m in microbatch_counts]
    check(ranks, cases)


@pytest.mark.multiprocess
def test_v_schedules_with_data_parallelism_match_the_reference_at_every_zero_level():
    """2×2: pipeline ranks × replicas, ZeRO 0–3, with and without recomputation and portioned reduces."""
    cases = list(itertools.product(V_SCHEDULES, (0, 1, 2, 3), ("none", "full"), (1, 3)))
    per_process = layerpipe.launch(run_data_parallel, 4, (2, 2, cases), timeout=600)
    check_results(2, 2, cases, per_process)


# ---------------------------------------------------------------- unit costs: bubble and memory against the papers
def simulated(name: str, ranks: int, microbatches: int) -> tuple[float, float]:
    """Return (bubble over compute time, peak activation memory) of ``name`` with unit F, I and W on one model.

    The V schedules split the model into twice as many stages, so each of
    their stages takes half the time and holds half the activations; memory
    is in micro-batches of a one-stage-per-rank stage's activations.
    """
    stages_per_rank = 2 if name in V_SCHEDULES else 1
    share = 1 / stages_per_rank
    cost = CostModel(forward_time=share, backward_time=2 * share, activation_bytes=share)
    config = ScheduleConfig(name, ranks, microbatches, stages_per_rank)
    result = simulate(build_schedule(config), cost)
    return result.step_time / result.ideal_time - 1, max(rank.peak_activation_bytes for rank in result.ranks)


SIZES = [(p, m) for p in (2, 3, 4, 6, 8) for m in (2 * p, 4 * p)]


@pytest.mark.parametrize("ranks, microbatches", SIZES)
def test_zb_v_bubble_is_below_zb_h1_below_1f1b_at_the_same_memory(ranks, microbatches):
    one_f_one_b, zb_h1, zb_v = (simulated(name, ranks, microbatches) for name in ("1f1b", "zero-bubble", "zb-v"))
    assert zb_v[0] < zb_h1[0] < one_f_one_b[0]
    assert one_f_one_b[0] == pytest.approx((ranks - 1) / microbatches)
    assert zb_h1[0] == pytest.approx((ranks - 1) / (3 * microbatches))
    assert zb_v[1] == zb_h1[1] == one_f_one_b[1] == ranks


@pytest.mark.parametrize("ranks, microbatches", SIZES)
def test_v_half_and_v_min_hold_the_memory_the_paper_states(ranks, microbatches):
    """Peak activations (p+2)//2 and (p+4)//3 of 1F1B's p (Qi et al., NeurIPS 2024), bubbles near p/2m and 2p/3m."""
    one_f_one_b = simulated("1f1b", ranks, microbatches)
    v_half, v_min = simulated("v-half", ranks, microbatches), simulated("v-min", ranks, microbatches)
    assert v_half[1] == (ranks + 2) // 2 and v_min[1] == (ranks + 4) // 3
    assert v_half[1] / one_f_one_b[1] <= 0.5 + 1 / ranks and v_min[1] / one_f_one_b[1] <= 1 / 3 + 4 / (3 * ranks)
    assert v_half[0] <= 1.1 * ranks / (2 * microbatches) and v_min[0] <= 2 * ranks / (3 * microbatches)
    assert v_half[0] <= v_min[0] < one_f_one_b[0]


@pytest.mark.parametrize("name", V_SCHEDULES)
@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_every_microbatch_count_builds_and_validates(name, ranks):
    """No V schedule needs a least number of micro-batches: each order runs for any m (zb-v drops, as torch does)."""
    for microbatches in range(1, 3 * ranks + 2):
        build_schedule(ScheduleConfig(name, ranks, microbatches))


@pytest.mark.parametrize("gaps", [vshape.V_HALF_GAPS, vshape.V_MIN_GAPS], ids=["v-half", "v-min"])
@pytest.mark.parametrize("ranks", range(1, 11))
def test_the_building_block_repeats_without_collision_and_after_what_each_pass_needs(gaps, ranks):
    slots = vshape.building_block(ranks, *gaps)
    placement = vshape_placement(ranks)
    for rank in range(ranks):
        residues = [slot % vshape.CYCLE for (stage, _), slot in slots.items() if placement.rank_of(stage) == rank]
        assert sorted(residues) == list(range(vshape.CYCLE))
    last = 2 * ranks - 1
    for stage in range(last + 1):
        assert slots[stage, Kind.F] < slots[stage, Kind.I] < slots[stage, Kind.W]
        if stage:
            assert slots[stage - 1, Kind.F] < slots[stage, Kind.F]
        if stage < last:
            assert slots[stage + 1, Kind.I] < slots[stage, Kind.I]


# ---------------------------------------------------------------- measured on gloo: the activation meter
MEASURED_RANKS = 4


def _measured_peaks() -> dict[str, tuple]:
    """Worker: one step of each schedule on one model of 8 equal groups; the meter's peak and the rank's program."""
    found = {}
    for name in ("1f1b", "v-half", "v-min"):
        v_shaped = name in V_SCHEDULES
        pipe = layerpipe.Pipeline(
            wide_layers(stages=2 * MEASURED_RANKS),
            nn.functional.mse_loss,
            schedule=name,
            microbatches=4 * MEASURED_RANKS,
            stages_per_rank=2 if v_shaped else 1,
            partition=list(range(0, 40, 5 if v_shaped else 10)),
            track_memory=True,
            timeout=60,
        )
        pipe.train_step(*batch(8 * MEASURED_RANKS, width=8))
        memory = pipe.memory()
        found[name] = (memory["activations"], memory["forward_activations"], pipe.schedule.programs[pipe.rank])
    return found


@pytest.mark.multiprocess
def test_v_half_and_v_min_measured_peaks_are_the_memory_models_and_the_papers():
    """The meter's peak over ranks against 1F1B's: (p+2)//2/p and (p+4)//3/p (3/4 and 1/2 at p = 4), within 10 %."""
    per_rank = layerpipe.launch(_measured_peaks, MEASURED_RANKS, timeout=300)
    peak = {name: max(rank[name][0] for rank in per_rank) for name in ("1f1b", "v-half", "v-min")}
    stated = {"v-half": (MEASURED_RANKS + 2) // 2 / MEASURED_RANKS, "v-min": (MEASURED_RANKS + 4) // 3 / MEASURED_RANKS}
    for name, ratio in stated.items():
        measured = peak[name] / peak["1f1b"]
        assert abs(measured - ratio) <= 0.1 * ratio, f"{name}: measured {measured:.3f} of 1F1B's, stated {ratio:.3f}"
        for rank, results in enumerate(per_rank):
            measured_peak, stored, program = results[name]
            activation = [stored.get(stage, 0) for stage in range(2 * MEASURED_RANKS)]
            model = activation_peak(program, activation, [0] * len(activation)).bytes
            assert abs(measured_peak - model) <= 0.1 * model, (
                f"{name} rank {rank}: meter {measured_peak}, model {model}"
            )
