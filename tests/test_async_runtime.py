"""The async schedule on real gloo processes equals the single-process emulator, bit for bit.

For every weight policy, every delay correction and ``update_every`` in
{1, 2, 4}, on 2 and 4 pipeline ranks: the parameters after 20 updates of
every stage, each call's loss and every version record (weight versions of
forward, backward and update, and the ticks the ranks counted) are equal
to ``PipelinedBackprop``'s.  With data parallelism (ZeRO 0 and 1) the
replicas' sums differ in rounding only.  One launch per process count runs
all the cases, so processes start once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerpipe
from layerpipe.emulation import PipelinedBackprop
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import DELAY_CORRECTIONS, ScheduleConfig
from layerpipe.sim.simulator import simulate

WIDTH, SAMPLES, MICROBATCHES, UPDATES = 5, 4, 4, 20


def stages_of(count: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()).double() for _ in range(count - 1)] + [
        nn.Linear(WIDTH, 2).double()
    ]


def batches(calls: int, microbatches: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(SAMPLES * microbatches, WIDTH, dtype=torch.float64, generator=generator),
            torch.randn(SAMPLES * microbatches, 2, dtype=torch.float64, generator=generator),
        )
        for _ in range(calls)
    ]


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=0.01)


def cases_for(stages: int) -> list[dict]:
    """Return every valid (policy, correction, k) case on ``stages`` stages, each run for 20 updates."""
    cases = []
    for policy in ("stashed", "double-buffered", "live"):
        everies = [1, 2, 4] if policy != "double-buffered" else [k for k in (2, 4, 6) if k >= 2 * (stages - 1)]
        for correction in DELAY_CORRECTIONS:
            for every in everies:
                microbatches = max(MICROBATCHES, every)
                calls = UPDATES * every // microbatches
                cases.append(
                    dict(
                        stages=stages,
                        microbatches=microbatches,
                        every=every,
                        policy=policy,
                        correction=correction,
                        calls=calls,
                        flush_after=(),
                    )
                )
    return cases


def run_cases(cases: list[dict], data_parallel: int = 1, zero: int = 0) -> list[dict]:
    """Worker: train every case with the async schedule; return what each rank saw."""
    results = []
    for case in cases:
        pipe = layerpipe.Pipeline(
            stages_of(case["stages"]),
            nn.functional.mse_loss,
            schedule="async",
            microbatches=case["microbatches"],
            update_every=case["every"],
            weight_policy=case["policy"],
            delay_correction=case["correction"],
            data_parallel=data_parallel,
            zero=zero,
            optimizer=sgd,
            timeout=60,
            partition=list(range(case["stages"])),
        )
        losses = []
        for call, (inputs, targets) in enumerate(batches(case["calls"], case["microbatches"])):
            losses.append(pipe.train_step(inputs, targets))
            if call in case["flush_after"]:
                pipe.flush()
        state = pipe.gathered_state_dict()  # flushes
        results.append(
            dict(losses=losses, state=state, records=pipe.version_records(), versions=pipe.weight_versions())
        )
        pipe.close()  # its gloo groups' threads would outlive it
    return results


def sub_minibatches(batch: torch.Tensor, microbatches: int, replicas: int) -> list[torch.Tensor]:
    """Return the batch's sub-minibatches as the replicas see them together: replica ``d`` takes the ``d``-th share."""
    shares = [share.chunk(microbatches) for share in batch.chunk(replicas)]
    return [torch.cat(parts) for parts in zip(*shares)]


def emulate(case: dict, replicas: int = 1) -> dict:
    """Return the emulator's parameters, per-call mean losses and records for ``case`` (a stream per flush)."""
    stages = stages_of(case["stages"])
    pipe = PipelinedBackprop(
        stages, nn.functional.mse_loss, sgd, case["every"], case["policy"], delay_correction=case["correction"]
    )
    inputs, targets, losses = [], [], []
    ends = sorted(set(case["flush_after"]) | {case["calls"] - 1})
    for call, (batch_inputs, batch_targets) in enumerate(batches(case["calls"], case["microbatches"])):
        inputs += sub_minibatches(batch_inputs, case["microbatches"], replicas)
        targets += sub_minibatches(batch_targets, case["microbatches"], replicas)
        if call in ends:
            found = pipe.train(inputs, targets)
            losses += [
                sum(found[i : i + case["microbatches"]]) / case["microbatches"]
                for i in range(0, len(found), case["microbatches"])
            ]
            inputs, targets = [], []
    state = {name: p.detach() for name, p in nn.Sequential(*stages).named_parameters()}
    return dict(losses=losses, state=state, records=pipe.records, versions=pipe.weight_versions())


def check_identical(cases: list[dict], per_rank: list[list[dict]]) -> None:
    for index, case in enumerate(cases):
        expected = emulate(case)
        rows = [results[index] for results in per_rank]
        state = {name: value for row in rows for name, value in row["state"].items()}
        assert sorted(state) == sorted(expected["state"]), case
        for name, value in state.items():
            assert torch.equal(value, expected["state"][name]), f"{case}: {name} differs from the emulator's"
        records = sorted(record for row in rows for record in row["records"])
        assert records == sorted(expected["records"]), f"{case}: version records differ"
        stages = case["stages"]
        assert {(r.stage, r.staleness) for r in records} == {(s, 2 * (stages - 1 - s)) for s in range(stages)}, (
            f"{case}: the ranks measured another staleness than 2(S-1-s)"
        )
        last = case["stages"] - 1
        assert rows[last]["losses"] == pytest.approx(expected["losses"], rel=1e-15, abs=0), case
        assert all(row["losses"] == rows[last]["losses"] for row in rows), "every rank returns the call's loss"
        versions = {stage: count for row in rows for stage, count in row["versions"].items()}
        assert versions == expected["versions"], case


@pytest.mark.multiprocess
def test_two_ranks_equal_the_emulator_bit_for_bit_for_every_policy_correction_and_update_interval():
    cases = cases_for(2) + [
        dict(stages=2, microbatches=4, every=2, policy="stashed", correction="spike", calls=6, flush_after=(1, 2))
    ]
    per_rank = layerpipe.launch(run_cases, 2, (cases,), timeout=120)
    check_identical(cases, per_rank)


@pytest.mark.multiprocess
def test_four_ranks_equal_the_emulator_bit_for_bit_for_every_policy_correction_and_update_interval():
    cases = cases_for(4)
    assert {case["policy"] for case in cases} == {"stashed", "double-buffered", "live"}
    per_rank = layerpipe.launch(run_cases, 4, (cases,), timeout=300)
    check_identical(cases, per_rank)


@pytest.mark.multiprocess
@pytest.mark.parametrize("zero", [0, 1])
def test_data_parallel_replicas_reduce_each_update_and_match_the_emulator(zero):
    corrections = ("none", "spike") if zero else ("none", "spike+predict")
    cases = [
        dict(stages=2, microbatches=4, every=2, policy=policy, correction=correction, calls=6, flush_after=())
        for policy in ("stashed", "live")
        for correction in corrections
    ]
    per_rank = layerpipe.launch(run_cases, 4, (cases, 2, zero), timeout=120)
    for index, case in enumerate(cases):
        expected = emulate(case, replicas=2)
        for rank, results in enumerate(per_rank):
            for name, value in results[index]["state"].items():
                assert torch.allclose(value, expected["state"][name], rtol=1e-12, atol=1e-14), (
                    f"{case} process {rank}: {name}"
                )


def test_the_measured_delays_are_the_schedules_and_double_buffering_crosses_one_version():
    """What the runtime records is checked against the formula here, on the emulator's records it equals above."""
    for stages in (2, 4):
        for case in cases_for(stages):
            records = emulate(case)["records"]
            assert {(r.stage, r.staleness) for r in records} == {(s, 2 * (stages - 1 - s)) for s in range(stages)}
            if case["policy"] == "double-buffered":
                assert all(r.update_version - 1 - r.forward_version <= 1 for r in records), case


@pytest.mark.parametrize("every", [1, 2, 4])
def test_the_stashed_versions_per_stage_match_the_simulator(every):
    case = dict(stages=4, microbatches=4, every=every, policy="stashed", correction="none", calls=4, flush_after=())
    config = ScheduleConfig("async", ranks=4, microbatches=4, update_every=every)
    simulated = simulate(build_schedule(config, calls=4))
    assert emulate(case)["versions"] == dict(enumerate(simulated.weight_versions))


def test_each_correction_changes_the_training_so_equality_above_is_not_vacuous():
    base = dict(stages=4, microbatches=4, every=1, policy="stashed", calls=5, flush_after=())
    first_stage = {
        correction: emulate({**base, "correction": correction})["state"]["0.0.weight"]
        for correction in DELAY_CORRECTIONS
    }
    values = list(first_stage.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1 :])


def run_beside_another_pipeline(case: dict) -> dict:
    """Worker: the async case, with a 1F1B pipeline on the same processes training between its calls.

    With 3·m micro-batches the other pipeline's message numbers are the
    stream's: only their own tag ranges keep the two apart.
    """
    other = layerpipe.Pipeline(
        stages_of(case["stages"]),
        nn.functional.mse_loss,
        schedule="1f1b",
        microbatches=3 * case["microbatches"],
        optimizer=sgd,
        timeout=60,
    )
    other_batch = batches(1, 3 * case["microbatches"], seed=5)[0]
    pipe = layerpipe.Pipeline(
        stages_of(case["stages"]),
        nn.functional.mse_loss,
        schedule="async",
        microbatches=case["microbatches"],
        update_every=case["every"],
        optimizer=sgd,
        timeout=60,
        partition=list(range(case["stages"])),
    )
    for inputs, targets in batches(case["calls"], case["microbatches"]):
        pipe.train_step(inputs, targets)
        other.train_step(*other_batch)  # while the stream has sends in flight
    return pipe.gathered_state_dict()


@pytest.mark.multiprocess
def test_another_pipeline_training_between_calls_does_not_disturb_the_stream():
    case = dict(stages=2, microbatches=4, every=1, policy="stashed", correction="none", calls=4, flush_after=())
    expected = emulate(case)["state"]
    for state in layerpipe.launch(run_beside_another_pipeline, 2, (case,), timeout=60):
        assert all(torch.equal(value, expected[name]) for name, value in state.items())
