"""The single-process emulator of pipelined backpropagation, against synchronous training and the schedule's facts.

Degenerate cases are exact in float64: one stage, or any number of stages with
the delays forced to zero, is synchronous training with gradient
accumulation over the virtual minibatch.  With delays, every sub-minibatch's
forward and backward at stage ``s`` are ``2(S-1-s)`` ticks apart, stashed
weights give each backward its forward's version, and the versions a stage
needs match the simulator's count for the same schedule.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layerpipe.emulation import PipelinedBackprop
from layerpipe.knobs import ConfigError
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ScheduleConfig
from layerpipe.sim.simulator import simulate

WIDTH, SAMPLES = 5, 4


def stages_of(count: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()).double() for _ in range(count - 1)] + [
        nn.Linear(WIDTH, 2).double()
    ]


def data(microbatches: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(SAMPLES, WIDTH, dtype=torch.float64, generator=generator) for _ in range(microbatches)]
    targets = [torch.randn(SAMPLES, 2, dtype=torch.float64, generator=generator) for _ in range(microbatches)]
    return inputs, targets


def optimizer(parameters):
    return torch.optim.AdamW(parameters, lr=0.05)


def synchronous(stages, inputs, targets, every):
    """Return the parameters after synchronous training with gradient accumulation over ``every`` sub-minibatches."""
    model = nn.Sequential(*copy.deepcopy(stages))
    step = optimizer(list(model.parameters()))
    for first in range(0, len(inputs), every):
        step.zero_grad()
        for index in range(first, first + every):
            (nn.functional.mse_loss(model(inputs[index]), targets[index]) / every).backward()
        step.step()
    return [p.detach() for p in model.parameters()]


def emulated(stages, inputs, targets, every, policy="stashed", zero_delay=False):
    pipe = PipelinedBackprop(stages, nn.functional.mse_loss, optimizer, every, policy, zero_delay)
    losses = pipe.train(inputs, targets)
    return [p.detach() for stage in stages for p in stage.parameters()], losses, pipe


@pytest.mark.parametrize("every", [1, 2, 4])
def test_one_stage_is_synchronous_training_with_gradient_accumulation(every):
    inputs, targets = data(8)
    expected = synchronous(stages_of(1), inputs, targets, every)
    found, _, _ = emulated(stages_of(1), inputs, targets, every)
    assert all(torch.equal(a, b) for a, b in zip(found, expected))


@pytest.mark.parametrize("policy", ["stashed", "live"])
@pytest.mark.parametrize("stages, every", [(2, 1), (2, 2), (4, 1), (4, 4)])
def test_zero_delays_are_synchronous_training_for_every_policy(stages, every, policy):
    inputs, targets = data(8)
    expected = synchronous(stages_of(stages), inputs, targets, every)
    found, _, _ = emulated(stages_of(stages), inputs, targets, every, policy, zero_delay=True)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-13) for a, b in zip(found, expected))


@pytest.mark.parametrize("policy", ["stashed", "live", "double-buffered"])
@pytest.mark.parametrize("stages", [2, 4])
def test_each_stage_sees_its_delay_and_the_policy_decides_the_backward_weights(stages, policy):
    every = 2 * (stages - 1) if policy == "double-buffered" else 2
    inputs, targets = data(12)
    _, losses, pipe = emulated(stages_of(stages), inputs, targets, every, policy)
    assert len(losses) == 12 and all(loss > 0 for loss in losses)
    assert len(pipe.records) == 12 * stages
    for record in pipe.records:
        assert record.staleness == 2 * (stages - 1 - record.stage)
        if policy == "live":
            assert record.backward_version >= record.forward_version
        else:
            assert record.backward_version == record.forward_version
        assert record.update_version > record.forward_version
    if stages > 1 and policy != "live":
        assert any(record.update_version - record.forward_version > 1 for record in pipe.records), (
            "with delays, some gradients reach an update made after their forward's"
        )


@pytest.mark.parametrize("every", [1, 2, 4])
def test_the_weight_versions_a_stage_needs_match_the_simulator(every):
    stages, microbatches = 4, 16
    _, _, pipe = emulated(stages_of(stages), *data(microbatches), every)
    config = ScheduleConfig("async", ranks=stages, microbatches=microbatches, update_every=every)
    simulated = simulate(build_schedule(config))
    assert pipe.weight_versions() == dict(enumerate(simulated.weight_versions))


def test_double_buffered_never_needs_more_than_two_versions():
    _, _, pipe = emulated(stages_of(3), *data(12), 4, "double-buffered")
    assert max(pipe.weight_versions().values()) <= 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(update_every=0), "update_every=0: must be a whole number of at least 1"),
        (dict(weight_policy="newest"), "weight_policy='newest': choose one of stashed, double-buffered, live"),
        (dict(update_every=2, weight_policy="double-buffered"), "update_every=2: double-buffered weights hold two"),
    ],
)
def test_bad_options_are_refused_in_one_line(arguments, message):
    with pytest.raises(ConfigError) as caught:
        PipelinedBackprop(stages_of(3), nn.functional.mse_loss, optimizer, **arguments)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_the_delay_aware_warm_up_starts_delayed_stages_slow_and_ends_at_the_full_rate():
    pipe = PipelinedBackprop(stages_of(4), nn.functional.mse_loss, optimizer, update_every=2, delay_warmup=10)
    assert [pipe.stale_updates(stage) for stage in range(4)] == [3, 2, 1, 0]
    assert pipe.learning_rate_factor(0, 0) == pytest.approx(1 / 3)
    assert pipe.learning_rate_factor(0, 5) == pytest.approx(3**-0.5)
    assert pipe.learning_rate_factor(0, 10) == pipe.learning_rate_factor(0, 50) == 1.0
    assert pipe.learning_rate_factor(3, 0) == pipe.learning_rate_factor(2, 0) == 1.0


def test_the_warm_up_scales_the_first_update_of_a_delayed_stage_and_leaves_the_optimizers_rate():
    """Two stages, k = 1: stage 0 is two updates stale, and its first gradient is the same with and without."""
    inputs, targets = data(1)
    moved = []
    for warmup in (0, 10):
        stages = stages_of(2)
        before = stages[0][0].weight.detach().clone()
        pipe = PipelinedBackprop(
            stages, nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.1), 1, delay_warmup=warmup
        )
        pipe.train(inputs, targets)
        moved.append(stages[0][0].weight.detach() - before)
        assert pipe.stages[0].optimizer.param_groups[0]["lr"] == 0.1
    assert torch.allclose(moved[1], moved[0] / 2, rtol=1e-12, atol=0)


def test_without_warm_up_the_learning_rate_is_the_optimizers():
    _, _, pipe = emulated(stages_of(3), *data(8), 2)
    assert all(stage.optimizer.param_groups[0]["lr"] == 0.05 for stage in pipe.stages)
    with pytest.raises(ConfigError, match="delay_warmup=-1: must be a whole number of updates"):
        PipelinedBackprop(stages_of(3), nn.functional.mse_loss, optimizer, delay_warmup=-1)


class TwoOut(nn.Module):
    """Returns a float tensor, an integer tensor and a float mask that needs no gradient."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH).double()

    def forward(self, x):
        h = torch.tanh(self.linear(x))
        return h, (x[:, 0] > 0).long(), torch.ones_like(x)


class TakeThree(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, 2).double()

    def forward(self, h, sign, mask):
        return self.linear(h * mask) + sign.unsqueeze(1).double()


@pytest.mark.parametrize("policy", ["stashed", "live"])
def test_stages_may_pass_integer_tensors_and_tensors_that_need_no_gradient(policy):
    torch.manual_seed(0)
    stages = [TwoOut(), TakeThree()]
    inputs, targets = data(4)
    pipe = PipelinedBackprop(stages, nn.functional.mse_loss, optimizer, 1, policy)
    assert len(pipe.train(inputs, targets)) == 4


def test_live_weights_recompute_with_the_forwards_dropout_masks():
    def dropped(seed=0):
        torch.manual_seed(seed)
        return [nn.Sequential(nn.Linear(WIDTH, 2), nn.Dropout(0.5)).double()]

    inputs, targets = data(6)
    results = []
    for policy in ("stashed", "live"):
        torch.manual_seed(7)
        stages = dropped()
        PipelinedBackprop(stages, nn.functional.mse_loss, optimizer, 2, policy, zero_delay=True).train(inputs, targets)
        results.append([p.detach().clone() for p in stages[0].parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_live_weights_hold_one_version_and_losses_are_the_sub_minibatch_losses_unscaled():
    inputs, targets = data(6)
    _, losses, pipe = emulated(stages_of(3), inputs, targets, 3, "live")
    assert pipe.weight_versions() == {0: 1, 1: 1, 2: 1}
    reference = nn.Sequential(*stages_of(3))
    with torch.no_grad():
        assert losses[0] == float(nn.functional.mse_loss(reference(inputs[0]), targets[0]))


def test_a_partial_virtual_minibatch_is_refused_and_records_number_on_across_calls():
    pipe = PipelinedBackprop(stages_of(2), nn.functional.mse_loss, optimizer, update_every=4)
    with pytest.raises(ConfigError, match="microbatches=6: give as many targets as inputs, in a multiple of"):
        pipe.train(*data(6))
    pipe.train(*data(4))
    pipe.train(*data(4))
    keys = [(record.stage, record.microbatch) for record in pipe.records]
    assert len(keys) == len(set(keys)) == 16 and all(record.update_version > 0 for record in pipe.records)
