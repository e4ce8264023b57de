"""One stage's weight versions in pipelined backpropagation: which weights a forward and a backward use.

Shared by the multi-process runtime (``stream.py``) and the single-process
emulator (``layerpipe.emulation``), so that both compute with the same
tensors in the same order.  A *version* counts the stage's updates so far.

Weight policies (which weights a backward uses):

* ``stashed`` — the weights its forward used (PipeDream's weight stashing):
  a forward runs on a copy of the current version, kept until the last
  backward that needs it;
* ``double-buffered`` — the same, holding at most two versions
  (PipeDream-2BW): refused where ``update_every`` is smaller than the first
  stage's delay, which would need a third;
* ``live`` — the current weights: the forward runs without keeping its
  graph and the backward runs it again, from the stored input, on the
  weights of that moment.

With ``predict`` among the corrections, a forward runs on the weights
predicted by ``delay.predicted`` instead of the current ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ...schedule.asynchronous import stage_delay as stage_delay  # the one spelling of the delay, for the stream's users
from ...schedule.config import WEIGHT_POLICIES as WEIGHT_POLICIES  # re-exported for the emulator
from ...schedule.config import ScheduleConfig, validate_config
from .delay import check_correction, corrected_step, learning_rate_factor, predicted


@dataclass(frozen=True, order=True)
class VersionRecord:
    """Which weights one sub-minibatch met at one stage: versions count the stage's updates so far.

    Ticks count slots (one forward and one backward of each stage per
    slot) from the start of the first stream; a stage runs the forward of
    sub-minibatch ``j`` at tick ``j + stage`` of its stream.
    """

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


def check_stream(stages: int, update_every: int, weight_policy: str, delay_correction: str = "none") -> None:
    """Refuse, with ``ConfigError``, options pipelined backpropagation cannot run with on ``stages`` stages.

    The async schedule's own rules (``schedule.config``): an ``update_every``
    below 1, an unknown policy or correction, and ``double-buffered`` where
    the first stage's delay ``2(S-1)`` exceeds ``update_every``.
    """
    validate_config(
        ScheduleConfig(
            "async",
            ranks=stages,
            microbatches=update_every if isinstance(update_every, int) and update_every > 0 else 1,
            update_every=update_every,
            weight_policy=weight_policy,
            delay_correction=delay_correction,
        )
    )


class WeightVersions:
    """The weight versions of stage ``stage`` (``module`` with its ``optimizer``) and the records of their use.

    ``delay`` is the stage's delay in ticks, ``stage_delay(S, s)`` = ``2(S-1-s)``; ``update_every``
    the sub-minibatches per update; ``warmup`` the updates of the
    delay-aware learning-rate warm-up (0: none).  Refuses, with
    ``ConfigError``, a correction the optimizer cannot support.
    """

    def __init__(
        self,
        stage: int,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        policy: str,
        correction: str,
        delay: int,
        update_every: int,
        warmup: int = 0,
    ):
        check_correction(correction, optimizer)
        self.stage, self.module, self.optimizer = stage, module, optimizer
        self.policy, self.correction = policy, correction
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.delay, self.update_every, self.warmup = delay, update_every, warmup
        self.horizon = delay / update_every  # the delay in updates, for the corrections
        self.stale_updates = -(-delay // update_every)
        self.version = 0
        self.backwards = 0
        self.most_versions = 1  # most versions needed at once: those in flight and the current one
        self.records: list[VersionRecord] = []
        self._stash: dict[int, dict[str, torch.Tensor]] = {}  # version -> the weights its forwards ran on
        self._in_flight: dict[int, tuple[int, int]] = {}  # micro-batch -> (version, tick) of its forward
        self._pending: list[int] = []  # records waiting for the version of their update

    # ---------------------------------------------------------------- weights
    @property
    def keeps_graph(self) -> bool:
        """Return whether a forward keeps its graph for the backward (not under ``live``, which runs it again)."""
        return self.policy != "live"

    def forward_weights(self) -> dict[str, torch.Tensor]:
        """Return the weights a forward runs on now, by parameter name.

        A copy of the current version that requires a gradient (predicted
        under ``predict``) — the same copy for every forward of the version;
        under ``live`` without prediction, the parameters themselves.
        """
        if self.policy == "live" and "predict" not in self.correction:
            return dict(zip(self.names, self.parameters))
        if self.version not in self._stash:
            if "predict" in self.correction and self.optimizer is not None:
                copies = predicted(self.parameters, self.optimizer, self.horizon)
            else:
                copies = [p.detach().clone() for p in self.parameters]
            self._stash[self.version] = {
                name: copy.requires_grad_(self.policy != "live") for name, copy in zip(self.names, copies)
            }
        return self._stash[self.version]

    def backward_weights(self, microbatch: int) -> tuple[int, dict[str, torch.Tensor]]:
        """Return the version and weights ``microbatch``'s backward differentiates: its forward's, or the live ones."""
        if self.policy == "live":
            return self.version, dict(zip(self.names, self.parameters))
        version = self._in_flight[microbatch][0]
        return version, self._stash[version]

    # ---------------------------------------------------------------- bookkeeping
    def forward_ran(self, microbatch: int, tick: int) -> None:
        """Note that ``microbatch``'s forward ran at ``tick`` on the current version."""
        self._in_flight[microbatch] = (self.version, tick)
        self._forget_unused()

    def backward_ran(self, microbatch: int, tick: int, backward_version: int) -> bool:
        """Record ``microbatch``'s backward at ``tick``; return whether the stage must update now (every ``k``-th)."""
        version, forward_tick = self._in_flight.pop(microbatch)
        self._pending.append(len(self.records))
        self.records.append(VersionRecord(self.stage, microbatch, version, backward_version, -1, forward_tick, tick))
        self.backwards += 1
        return self.backwards % self.update_every == 0

    def accumulate(self, gradients) -> None:
        """Add the weight gradients of one backward (``None`` where a parameter got none) to the parameters' ``.grad``."""
        for parameter, gradient in zip(self.parameters, gradients):
            if gradient is None:
                continue
            if parameter.grad is None:
                parameter.grad = gradient.clone()
            else:
                parameter.grad.add_(gradient)

    def update(self) -> None:
        """Step the optimizer (corrected, at the warm-up's rate) and date the records of the gradients it used.

        The warm-up scales the optimizer's learning rate for this step only,
        so a schedule the caller sets between steps stays in charge.  The
        caller zeroes the gradients afterwards (each interpreter its own way).
        """
        if self.optimizer is not None:
            factor = learning_rate_factor(self.stale_updates, self.version, self.warmup)
            rates = [group["lr"] for group in self.optimizer.param_groups]
            if factor != 1.0:
                for group in self.optimizer.param_groups:
                    group["lr"] = group["lr"] * factor
            corrected_step(self.optimizer, self.correction, self.horizon)
            for group, rate in zip(self.optimizer.param_groups, rates):
                group["lr"] = rate
        self.version += 1
        for index in self._pending:
            self.records[index] = dataclasses.replace(self.records[index], update_version=self.version)
        self._pending.clear()
        self._forget_unused()

    def _forget_unused(self) -> None:
        """Drop stashed versions no sub-minibatch in flight needs, and count how many are needed now."""
        needed = {self.version}
        if self.policy != "live":  # live backwards use the current weights, whatever their forward ran on
            needed |= {version for version, _ in self._in_flight.values()}
        self.most_versions = max(self.most_versions, len(needed))
        for version in [v for v in self._stash if v not in needed]:
            del self._stash[version]

    @property
    def held_versions(self) -> int:
        """Return the most weight versions the stage held at once (1 under ``live``)."""
        return 1 if self.policy == "live" else self.most_versions
