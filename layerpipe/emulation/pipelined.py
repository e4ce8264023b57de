"""A single-process emulator of asynchronous pipelined backpropagation, tick by tick.

``PipelinedBackprop`` runs the ``async`` schedule's semantics on a list of
stages (any ``nn.Module`` each) in one process: at tick ``t`` stage ``s`` of
``S`` runs the forward of sub-minibatch ``t - s`` and then the backward of
sub-minibatch ``t - s - 2(S-1-s)``, and after every ``update_every`` of its
backwards it steps its own optimizer on the accumulated gradient, scaled so
that it is the mean over the virtual minibatch of ``update_every``
sub-minibatches.  No stage waits for another.  It serves fast experiments
without processes and is the reference the multi-process runtime is
checked against (bit for bit, ``tests/test_async_runtime.py``).

Which weights a forward and a backward use (``weight_policy``: stashed,
double-buffered, live) and how an update corrects for the delay
(``delay_correction``: none, spike, predict, spike+predict) are
``runtime.stream.versions.WeightVersions``'s and ``runtime.stream.delay``'s, shared with
the multi-process runtime so that both compute the same tensors.
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

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..knobs import ConfigError
from ..runtime.stage import backward_roots, carries_gradient
from ..runtime.stream.delay import learning_rate_factor
from ..runtime.stream.versions import VersionRecord, WeightVersions, check_stream, stage_delay
from ..runtime.substitute import call_with
from ..schedule.config import WEIGHT_POLICIES

__all__ = ["WEIGHT_POLICIES", "PipelinedBackprop", "VersionRecord"]


class _Stage:
    """One stage's module, weight versions and the tensors of its sub-minibatches in flight."""

    def __init__(self, index: int, module: nn.Module, versions: WeightVersions):
        self.index, self.module, self.versions = index, module, versions
        self.optimizer = versions.optimizer
        self.in_flight: dict[int, tuple] = {}  # micro-batch -> (inputs, outputs, random state)
        self.sent_back: dict[int, tuple] = {}  # micro-batch -> gradients of this stage's inputs


class PipelinedBackprop:
    """Pipelined backpropagation over ``stages``, each with its own optimizer from ``optimizer(parameters)``.

    ``loss_fn(output, target)`` returns a sub-minibatch's mean loss.
    Refuses, with ``ConfigError``, an unknown ``weight_policy`` or
    ``delay_correction``, an ``update_every`` below 1, ``double-buffered``
    where a stage's delay exceeds ``update_every``, and a correction the
    optimizer cannot support (see ``runtime.stream.delay``).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        loss_fn: Callable,
        optimizer: Callable,
        update_every: int = 1,
        weight_policy: str = "stashed",
        zero_delay: bool = False,
        delay_warmup: int = 0,
        delay_correction: str = "none",
    ):
        check_stream(len(stages), update_every, weight_policy, delay_correction)
        if isinstance(delay_warmup, bool) or not isinstance(delay_warmup, int) or delay_warmup < 0:
            raise ConfigError("delay_warmup", delay_warmup, "must be a whole number of updates, 0 for none")
        self.delay_warmup = delay_warmup
        self.loss_fn, self.update_every, self.zero_delay = loss_fn, update_every, zero_delay
        self.stages = [
            _Stage(
                index,
                module,
                WeightVersions(
                    index,
                    module,
                    optimizer([p for p in module.parameters() if p.requires_grad]),
                    weight_policy,
                    delay_correction,
                    self.delay_of(index, len(stages)),
                    update_every,
                    delay_warmup,
                ),
            )
            for index, module in enumerate(stages)
        ]
        self.losses: dict[int, float] = {}
        self._targets: Sequence[torch.Tensor] = ()
        self._offset = (0, 0)  # sub-minibatches and ticks of the earlier calls, so records stay unique

    def delay_of(self, stage: int, stages: int) -> int:
        """Return the ticks between a sub-minibatch's forward and backward at ``stage`` of ``stages``: ``2(S-1-s)``, or 0."""
        return 0 if self.zero_delay else stage_delay(stages, stage)

    def delay(self, stage: int) -> int:
        """Return the ticks between a sub-minibatch's forward and backward at ``stage``: ``2(S-1-s)``, or 0."""
        return self.delay_of(stage, len(self.stages))

    @property
    def records(self) -> list[VersionRecord]:
        """Return every stage's version records, stage by stage, each in the order of its backwards."""
        return [record for stage in self.stages for record in stage.versions.records]

    def train(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list[float]:
        """Stream the sub-minibatches through the pipeline and drain it; return each sub-minibatch's loss in order.

        Each call is a stream of its own that ends drained (one call over
        ``n·m`` sub-minibatches is what ``n`` calls of the async schedule
        run before a flush); records number sub-minibatches and ticks on
        across calls.  Refuses, with ``ConfigError``, a count that is not a
        whole number of virtual minibatches (``update_every`` sub-minibatches each).
        """
        if len(inputs) % self.update_every or len(inputs) != len(targets):
            raise ConfigError(
                "microbatches",
                len(inputs),
                f"give as many targets as inputs, in a multiple of "
                f"`update_every` ({self.update_every}) sub-minibatches",
            )
        self.losses, self._targets = {}, targets
        first, ticks = self._offset
        if self.zero_delay:
            for microbatch in range(len(inputs)):
                self._one_at_a_time(microbatch, inputs)
        else:
            for tick in range(len(inputs) + self.delay(0)):
                self._run_tick(tick, inputs)
        spent = len(inputs) + self.delay(0)
        self._offset = (first + len(inputs), ticks + spent)
        return [self.losses[microbatch] for microbatch in range(len(inputs))]

    # ---------------------------------------------------------------- ticks
    def _run_tick(self, tick: int, inputs) -> None:
        # Stages in increasing order: each reads only what its neighbours made at earlier ticks.
        for stage in self.stages:
            microbatch = tick - stage.index
            if 0 <= microbatch < len(inputs):
                self._forward(stage, microbatch, tick, inputs)
            back = tick - stage.index - self.delay(stage.index)
            if 0 <= back < len(inputs):
                self._backward(stage, back, tick)

    def _one_at_a_time(self, microbatch: int, inputs) -> None:
        for stage in self.stages:
            self._forward(stage, microbatch, microbatch, inputs)
        for stage in reversed(self.stages):
            self._backward(stage, microbatch, microbatch)

    # ---------------------------------------------------------------- one stage
    def _forward(self, stage: _Stage, microbatch: int, tick: int, inputs) -> None:
        if stage.index == 0:
            received = (inputs[microbatch],)
        else:
            received = self.stages[stage.index - 1].in_flight[microbatch][1]
        leaves = tuple(t.detach().requires_grad_(carries_gradient(t.dtype)) for t in received)
        random_state = torch.get_rng_state()  # live's second forward draws the same dropout masks
        with torch.set_grad_enabled(stage.versions.keeps_graph):
            outputs = self._stage_outputs(stage, stage.versions.forward_weights(), leaves, microbatch)
        stage.in_flight[microbatch] = (leaves, outputs, random_state)
        first, ticks = self._offset
        stage.versions.forward_ran(first + microbatch, ticks + tick)

    def weight_versions(self) -> dict[int, int]:
        """Return, per stage, the most weight versions it held at once: what stashing cost (1 with live weights)."""
        return {stage.index: stage.versions.held_versions for stage in self.stages}

    def _stage_outputs(self, stage: _Stage, weights: dict, leaves: tuple, microbatch: int) -> tuple:
        """Return the stage's outputs on ``leaves`` with ``weights``; the last stage's is its scaled loss.

        The last stage also records the sub-minibatch's loss, before scaling.
        """
        outputs = _as_tuple(call_with(stage.module, weights, leaves))
        if stage.index < len(self.stages) - 1:
            return outputs
        loss = self.loss_fn(outputs[0] if len(outputs) == 1 else outputs, self._targets[microbatch])
        self.losses[microbatch] = float(loss.detach())
        return (loss * (1.0 / self.update_every),)

    def _backward(self, stage: _Stage, microbatch: int, tick: int) -> None:
        leaves, outputs, random_state = stage.in_flight.pop(microbatch)
        first, ticks = self._offset
        version, weights = stage.versions.backward_weights(first + microbatch)
        if not stage.versions.keeps_graph:  # the forward again, from the stored input, with the current weights
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.set_rng_state(random_state)
                outputs = self._stage_outputs(stage, weights, leaves, microbatch)
        roots, gradients = self._roots(stage, microbatch, outputs)
        wanted = [leaf for leaf in leaves if carries_gradient(leaf.dtype)] if stage.index else []
        differentiated = wanted + list(weights.values())
        found = (
            torch.autograd.grad(roots, differentiated, gradients, allow_unused=True)
            if roots
            else (None,) * len(differentiated)
        )
        self._deliver(stage, microbatch, wanted, found[: len(wanted)])
        stage.versions.accumulate(found[len(wanted) :])
        if stage.versions.backward_ran(first + microbatch, ticks + tick, version):
            stage.versions.update()
            stage.optimizer.zero_grad(set_to_none=True)

    def _roots(self, stage: _Stage, microbatch: int, outputs: tuple) -> tuple[list, list | None]:
        """Return the outputs to differentiate and their incoming gradients (the next stage sent one per float input)."""
        if stage.index == len(self.stages) - 1:
            return list(outputs), None
        return backward_roots(outputs, self.stages[stage.index + 1].sent_back.pop(microbatch))

    def stale_updates(self, stage: int) -> int:
        """Return how many of its own updates a stage makes while a sub-minibatch is in flight: ``ceil(delay / k)``."""
        return self.stages[stage].versions.stale_updates

    def learning_rate_factor(self, stage: int, update: int) -> float:
        """Return the factor of the stage's learning rate at its ``update``-th update (see ``runtime.stream.delay``)."""
        return learning_rate_factor(self.stale_updates(stage), update, self.delay_warmup)

    def _deliver(self, stage: _Stage, microbatch: int, wanted, gradients) -> None:
        """Keep the gradients of the stage's inputs for the previous stage's backward."""
        if stage.index:
            stage.sent_back[microbatch] = tuple(
                torch.zeros_like(leaf) if g is None else g for leaf, g in zip(wanted, gradients)
            )


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)
