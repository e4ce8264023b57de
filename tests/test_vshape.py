"""The V-shape schedules (zb-v, v-half, v-min): refusals, float64 equality with the reference, unit-cost claims.

Their orders against torch's are in ``test_generators.py``; the whole-suite
equivalence tests cover them too (their schedule lists are read from the
registry), and here they run alone with enough micro-batches to fill the V
(``2p - 1`` and more).
"""

from __future__ import annotations

import itertools

import pytest
from test_data_parallel import check_results
from test_data_parallel import run_configurations as run_data_parallel
from test_runtime_equivalence import check

import layerpipe
from layerpipe.schedule.config import ConfigError, ScheduleConfig, validate_config
from layerpipe.schedule.registry import names_where

V_SCHEDULES = names_where(lambda record: record.placements == ("vshape",))


def test_the_v_schedules_are_registered_on_the_vshape_placement():
    assert set(V_SCHEDULES) >= {"zb-v"}
    for name in V_SCHEDULES:
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
def test_a_placement_other_than_the_v_is_refused(name):
    with pytest.raises(ConfigError, match=f"placement='looping': {name} runs on the vshape placement"):
        validate_config(ScheduleConfig(name, ranks=2, microbatches=4, placement="looping"))


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
