"""The program guard: a step with a non-finite gradient on any process is skipped on every rank together.

``skip_nonfinite`` puts a ``GUARD`` before each rank's first ``STEP``; the
guard all-reduces one number (the first stage whose reduced gradient is not
finite) over every process, and when there is one every rank skips the rest
of its program alike.  Shown on a 4-rank pipeline with a gradient made NaN
on one rank only, and with data parallelism at ZeRO-3.
"""

from __future__ import annotations

import pytest
import torch
from runtime_models import batch, mlp_layers
from torch import nn

import layerpipe
from layerpipe.schedule.actions import Kind
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ConfigError, ScheduleConfig
from layerpipe.sim.simulator import simulate

POISONED_RANK = 2


def train_with_a_poisoned_step(options: dict) -> list[tuple]:
    """Worker: three steps; in the second, one rank's first parameter gets NaN gradients. Return what each step did."""
    pipe = layerpipe.Pipeline(
        mlp_layers(),
        nn.functional.mse_loss,
        schedule="gpipe",
        microbatches=4,
        skip_nonfinite=True,
        timeout=60,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.05),
        **options,
    )
    rank = torch.distributed.get_rank()
    seen = []
    for step in range(3):
        handle = None
        if step == 1 and pipe.rank == POISONED_RANK % pipe.layout.pipeline and pipe.replica == 0:
            parameter = next(iter(pipe.stages.values())).layers[0].weight
            handle = parameter.register_hook(lambda gradient: gradient * float("nan"))
        before = {name: value.detach().clone() for name, value in pipe.named_parameters()}
        pipe.train_step(*batch(16, seed=step + 1))
        after = dict(pipe.named_parameters())
        unchanged = all(torch.equal(before[name], after[name]) for name in before)
        skipped_rows = [event[2].kind for event in pipe.last_result.events if event[1] == "skipped"]
        seen.append((rank, step, pipe.last_step_skipped, unchanged, skipped_rows))
        if handle is not None:
            handle.remove()
    return seen


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "processes, options", [(4, {}), (4, dict(data_parallel=2, zero=3))], ids=["4 ranks", "2 ranks x 2 replicas, zero 3"]
)
def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(processes, options):
    per_process = layerpipe.launch(train_with_a_poisoned_step, processes, (options,), timeout=120)
    for rows in per_process:
        (
            (_, _, first, first_unchanged, _),
            (_, _, second, second_unchanged, skipped),
            (_, _, third, third_unchanged, _),
        ) = rows
        assert skipped and set(skipped) <= {Kind.STEP, Kind.GATHER}, "the measured timeline shows what was skipped"
        assert first is None and not first_unchanged, "a clean step steps"
        assert second is not None and second_unchanged, "the poisoned step is skipped everywhere"
        assert third is None and not third_unchanged, "training goes on"
    skipped_at = {rows[1][2] for rows in per_process}
    assert len(skipped_at) == 1, "every process names the same stage"


def test_the_guard_sits_before_each_ranks_first_step_and_the_simulator_waits_there_for_every_rank():
    schedule = build_schedule(ScheduleConfig("breadth-first", ranks=4, microbatches=8, skip_nonfinite=True))
    for program in schedule.programs:
        kinds = [action.kind for action in program]
        assert kinds.count(Kind.GUARD) == 1 and kinds[kinds.index(Kind.GUARD) + 1] is Kind.STEP
    result = simulate(schedule)
    guards = [event for event in result.timeline.events if event[2].kind is Kind.GUARD]
    assert len(guards) == 4
    assert len({round(event[4], 9) for event in guards}) == 1, "every rank passes the guard at the same time"
    last_arrival = max(
        max(
            e[4]
            for e in result.timeline.events
            if e[0] == event[0] and e[2].kind is not Kind.GUARD and e[2].kind is not Kind.STEP
        )
        for event in guards
    )
    assert guards[0][4] >= last_arrival


def test_async_refuses_the_guard_in_one_line():
    with pytest.raises(ConfigError, match="skip_nonfinite=True: async updates each stage on its own"):
        build_schedule(ScheduleConfig("async", ranks=2, microbatches=4, skip_nonfinite=True))


def test_the_simulator_shows_the_steps_a_failing_guard_skips():
    schedule = build_schedule(
        ScheduleConfig("breadth-first", ranks=2, microbatches=4, data_parallel=2, zero=1, skip_nonfinite=True)
    )
    result = simulate(schedule, guard_fails=True)
    skipped = [event for event in result.timeline.events if event[1] == "skipped"]
    expected = [
        action for program in schedule.programs for action in program if action.kind in (Kind.STEP, Kind.GATHER)
    ]
    assert sorted(str(event[2]) for event in skipped) == sorted(str(action) for action in expected)
    assert not any(event[1] == "skipped" for event in simulate(schedule).timeline.events)
