"""A single-process emulator of asynchronous pipelined backpropagation, tick by tick.

``PipelinedBackprop`` runs the ``async`` schedule's semantics on a list of
stages (any ``nn.Module`` each) in one process: at tick ``t`` stage ``s`` of
``S`` runs the forward of sub-minibatch ``t - s`` and then the backward of
sub-minibatch ``t - s - 2(S-1-s)``, and after every ``update_every`` of its
backwards it steps its own optimizer on the accumulated gradient, scaled so
that it is the mean over the virtual minibatch of ``update_every``
sub-minibatches.  No stage waits for another.  It serves fast experiments
without processes and is the reference the multi-process runtime will be
checked against.

Weight policies (which weights a backward uses):

* ``stashed`` — the weights its forward used (PipeDream's weight stashing):
  each version a forward used is kept until the last backward that needs it;
* ``double-buffered`` — the same, but a stage may hold at most two versions
  (PipeDream-2BW); refused when ``update_every`` is smaller than a stage's
  delay, where a third version would be needed;
* ``live`` — the current weights: the forward is run again from the stored
  input with the current weights, and both gradients come from that.

``delay_warmup=K`` scales a stage's learning rate by ``τ^-(1 - min(u/K, 1))``
at its ``u``-th update, ``τ`` being how many of its updates its gradients
are stale: delayed stages start slow and reach the full rate after ``K``
updates (PipeMare's rescheduling).

``zero_delay=True`` runs every sub-minibatch's forward and backward through
all stages before the next one starts — synchronous training with gradient
accumulation — the degenerate case the asynchronous runs are compared with.
Every run records, per stage and sub-minibatch, the weight version of its
forward, of its backward and of the update that used its gradient
(``records``), and the ticks between its forward and backward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..knobs import ConfigError
from ..runtime.stage import backward_roots, carries_gradient

WEIGHT_POLICIES = ("stashed", "double-buffered", "live")


@dataclass(frozen=True)
class VersionRecord:
    """Which weights one sub-minibatch met at one stage: versions count the stage's updates so far."""

    stage: int
    microbatch: int
    forward_version: int
    backward_version: int
    update_version: int
    forward_tick: int
    backward_tick: int

    @property
    def staleness(self) -> int:
        """Return the ticks between the sub-minibatch's forward and backward at this stage."""
        return self.backward_tick - self.forward_tick


class _Stage:
    """One stage's module, optimizer, weight versions and sub-minibatches in flight."""

    def __init__(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer, policy: str):
        self.index, self.module, self.optimizer, self.policy = index, module, optimizer, policy
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        self.version = 0
        self.backwards = 0
        self.stash: dict[int, dict[str, torch.Tensor]] = {}  # version -> detached copies of the weights
        self.in_flight: dict[int, tuple] = {}  # micro-batch -> (version, tick, inputs, outputs)
        self.sent_back: dict[int, tuple] = {}  # micro-batch -> gradients of this stage's inputs
        self.most_versions = 1  # most weight versions needed at once: in flight, and the current one

    def weights(self, version: int) -> dict[str, torch.Tensor]:
        """Return the weights of ``version`` for a functional call (stashed copies, or the live parameters)."""
        if self.policy == "live":
            return dict(zip(self.names, self.parameters))
        if version not in self.stash:
            self.stash[version] = {name: p.detach().clone().requires_grad_(True)
                                   for name, p in zip(self.names, self.parameters)}
        return self.stash[version]

    def forget_unused_versions(self) -> None:
        """Drop stashed versions no sub-minibatch in flight needs, and count how many are needed now."""
        needed = {entry[0] for entry in self.in_flight.values()} | {self.version}
        self.most_versions = max(self.most_versions, len(needed))
        for version in [v for v in self.stash if v not in needed]:
            del self.stash[version]


class PipelinedBackprop:
    """Pipelined backpropagation over ``stages``, each with its own optimizer from ``optimizer(parameters)``.

    ``loss_fn(output, target)`` returns a sub-minibatch's mean loss.
    Refuses, with ``ConfigError``, an unknown ``weight_policy``, an
    ``update_every`` below 1, and ``double-buffered`` where a stage's delay
    exceeds ``update_every``.
    """

    def __init__(self, stages: Sequence[nn.Module], loss_fn: Callable, optimizer: Callable, update_every: int = 1,
                 weight_policy: str = "stashed", zero_delay: bool = False, delay_warmup: int = 0):
        _check(len(stages), update_every, weight_policy)
        if isinstance(delay_warmup, bool) or not isinstance(delay_warmup, int) or delay_warmup < 0:
            raise ConfigError("delay_warmup", delay_warmup, "must be a whole number of updates, 0 for none")
        self.delay_warmup = delay_warmup
        self.stages = [_Stage(index, module, optimizer([p for p in module.parameters() if p.requires_grad]),
                              weight_policy) for index, module in enumerate(stages)]
        self.loss_fn, self.update_every, self.zero_delay = loss_fn, update_every, zero_delay
        self.records: list[VersionRecord] = []
        self.losses: dict[int, float] = {}
        self._targets: Sequence[torch.Tensor] = ()
        self._pending: dict[int, list[int]] = {}  # stage -> records waiting for the version of their update
        self._offset = (0, 0)  # sub-minibatches and ticks of the earlier calls, so records stay unique

    def delay(self, stage: int) -> int:
        """Return the ticks between a sub-minibatch's forward and backward at ``stage``: ``2(S-1-s)``, or 0."""
        return 0 if self.zero_delay else 2 * (len(self.stages) - 1 - stage)

    def train(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list[float]:
        """Stream the sub-minibatches through the pipeline and drain it; return each sub-minibatch's loss in order.

        Each call is a stream of its own that ends drained (one call over
        ``n·m`` sub-minibatches is what ``n`` calls of the async schedule
        run); records number sub-minibatches and ticks on across calls.
        Refuses, with ``ConfigError``, a count that is not a whole number of
        virtual minibatches (``update_every`` sub-minibatches each).
        """
        if len(inputs) % self.update_every or len(inputs) != len(targets):
            raise ConfigError("microbatches", len(inputs), f"give as many targets as inputs, in a multiple of "
                              f"`update_every` ({self.update_every}) sub-minibatches")
        self.losses, self._targets = {}, targets
        if self.zero_delay:
            for microbatch in range(len(inputs)):
                self._one_at_a_time(microbatch, inputs, targets)
        else:
            ticks = len(inputs) + 2 * (len(self.stages) - 1)
            for tick in range(ticks):
                self._run_tick(tick, inputs, targets)
        spent = len(inputs) if self.zero_delay else len(inputs) + 2 * (len(self.stages) - 1)
        self._offset = (self._offset[0] + len(inputs), self._offset[1] + spent)
        return [self.losses[microbatch] for microbatch in range(len(inputs))]

    # ---------------------------------------------------------------- ticks
    def _run_tick(self, tick: int, inputs, targets) -> None:
        # Stages in increasing order: each reads only what its neighbours made at earlier ticks.
        for stage in self.stages:
            microbatch = tick - stage.index
            if 0 <= microbatch < len(inputs):
                self._forward(stage, microbatch, tick, inputs, targets)
            back = tick - stage.index - self.delay(stage.index)
            if 0 <= back < len(inputs):
                self._backward(stage, back, tick)

    def _one_at_a_time(self, microbatch: int, inputs, targets) -> None:
        for stage in self.stages:
            self._forward(stage, microbatch, microbatch, inputs, targets)
        for stage in reversed(self.stages):
            self._backward(stage, microbatch, microbatch)

    # ---------------------------------------------------------------- one stage
    def _forward(self, stage: _Stage, microbatch: int, tick: int, inputs, targets) -> None:
        if stage.index == 0:
            received = (inputs[microbatch],)
        else:
            received = self.stages[stage.index - 1].in_flight[microbatch][3]
        leaves = tuple(t.detach().requires_grad_(carries_gradient(t.dtype)) for t in received)
        keep_graph = stage.policy != "live"  # live runs the forward again at the backward
        random_state = torch.get_rng_state()  # live's second forward draws the same dropout masks
        with torch.set_grad_enabled(keep_graph):
            outputs = self._stage_outputs(stage, stage.version, leaves, microbatch)
        stage.in_flight[microbatch] = (stage.version, tick, leaves, outputs, random_state)
        stage.forget_unused_versions()

    def weight_versions(self) -> dict[int, int]:
        """Return, per stage, the most weight versions it held at once: what stashing cost (1 with live weights)."""
        return {stage.index: 1 if stage.policy == "live" else stage.most_versions for stage in self.stages}

    def _stage_outputs(self, stage: _Stage, version: int, leaves: tuple, microbatch: int) -> tuple:
        """Return the stage's outputs on ``leaves`` with weights ``version``; the last stage's is its scaled loss.

        The last stage also records the sub-minibatch's loss, before scaling.
        """
        outputs = _as_tuple(functional_call(stage.module, stage.weights(version), leaves))
        if stage.index < len(self.stages) - 1:
            return outputs
        loss = self.loss_fn(outputs[0] if len(outputs) == 1 else outputs, self._targets[microbatch])
        self.losses[microbatch] = float(loss.detach())
        return (loss / self.update_every,)

    def _backward(self, stage: _Stage, microbatch: int, tick: int) -> None:
        version, forward_tick, leaves, outputs, random_state = stage.in_flight[microbatch]
        backward_version = version
        if stage.policy == "live":  # the forward again, from the stored input, with the current weights
            backward_version = stage.version
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.set_rng_state(random_state)
                outputs = self._stage_outputs(stage, backward_version, leaves, microbatch)
        roots, gradients = self._roots(stage, microbatch, outputs)
        weights = list(stage.weights(backward_version).values())
        wanted = [leaf for leaf in leaves if carries_gradient(leaf.dtype)] if stage.index else []
        found = torch.autograd.grad(roots, wanted + weights, gradients, allow_unused=True) if roots \
            else (None,) * (len(wanted) + len(weights))
        self._deliver(stage, microbatch, wanted, found[:len(wanted)])
        for parameter, gradient in zip(stage.parameters, found[len(wanted):]):
            if gradient is not None:
                parameter.grad = gradient.clone() if parameter.grad is None else parameter.grad + gradient
        del stage.in_flight[microbatch]
        self._count_backward(stage, microbatch, version, backward_version, forward_tick, tick)

    def _roots(self, stage: _Stage, microbatch: int, outputs: tuple) -> tuple[list, list | None]:
        """Return the outputs to differentiate and their incoming gradients (the next stage sent one per float input)."""
        if stage.index == len(self.stages) - 1:
            return list(outputs), None
        return backward_roots(outputs, self.stages[stage.index + 1].sent_back.pop(microbatch))

    def stale_updates(self, stage: int) -> int:
        """Return how many of its own updates a stage makes while a sub-minibatch is in flight: ``ceil(delay / k)``."""
        return -(-self.delay(stage) // self.update_every)

    def learning_rate_factor(self, stage: int, update: int) -> float:
        """Return the factor of the stage's learning rate at its ``update``-th update under the delay-aware warm-up.

        ``τ^-(1 - min(update / K, 1))`` for a stage whose gradients are ``τ``
        updates stale and a warm-up of ``K = delay_warmup`` updates: the rate
        starts at ``1/τ`` and reaches the optimizer's own at update ``K``
        (PipeMare's learning-rate rescheduling, Yang et al., MLSys 2021, in the
        form of PluralisResearch/AsyncPP's ``adjust_learning_rate``).  1 without
        a warm-up and for a stage without delay.
        """
        stale = self.stale_updates(stage)
        if not self.delay_warmup or stale <= 1:
            return 1.0
        return float(stale) ** -(1.0 - min(update / self.delay_warmup, 1.0))

    def _warm_up(self, stage: _Stage) -> None:
        if not self.delay_warmup:
            return
        factor = self.learning_rate_factor(stage.index, stage.version)
        for group in stage.optimizer.param_groups:
            group.setdefault("initial_lr_of_warmup", group["lr"])
            group["lr"] = group["initial_lr_of_warmup"] * factor

    def _deliver(self, stage: _Stage, microbatch: int, wanted, gradients) -> None:
        """Keep the gradients of the stage's inputs for the previous stage's backward."""
        if stage.index:
            stage.sent_back[microbatch] = tuple(torch.zeros_like(leaf) if g is None else g
                                                for leaf, g in zip(wanted, gradients))

    def _count_backward(self, stage: _Stage, microbatch: int, version: int, backward_version: int,
                        forward_tick: int, tick: int) -> None:
        """Record the backward; after every ``update_every`` of them, step the stage and date the records it used."""
        stage.backwards += 1
        pending = self._pending.setdefault(stage.index, [])
        pending.append(len(self.records))
        offset, ticks = self._offset
        self.records.append(VersionRecord(stage.index, offset + microbatch, version, backward_version, -1,
                                          ticks + forward_tick, ticks + tick))
        if stage.backwards % self.update_every == 0:
            self._warm_up(stage)
            stage.optimizer.step()
            stage.optimizer.zero_grad(set_to_none=True)
            stage.version += 1
            for index in pending:
                self.records[index] = dataclasses.replace(self.records[index], update_version=stage.version)
            pending.clear()
        stage.forget_unused_versions()


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _check(stages: int, update_every: int, weight_policy: str) -> None:
    if weight_policy not in WEIGHT_POLICIES:
        raise ConfigError("weight_policy", weight_policy, "choose one of " + ", ".join(WEIGHT_POLICIES))
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ConfigError("update_every", update_every, "must be a whole number of at least 1")
    longest = 2 * (stages - 1)
    if weight_policy == "double-buffered" and update_every < longest:
        raise ConfigError("update_every", update_every, f"double-buffered weights hold two versions, so a stage "
                          f"must not update more than once while a sub-minibatch is in flight: the first stage's "
                          f"delay is {longest} ticks, so use `update_every` {longest} or more (or stashed weights)")
