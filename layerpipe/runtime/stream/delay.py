"""Delay corrections of pipelined backpropagation: spike compensation and linear weight prediction.

In pipelined backpropagation a stage's gradient arrives ``D`` of its own
updates after the weights it was computed with.  Kosson et al., "Pipelined
Backpropagation at Scale: Training Large Models without Batches" (MLSys
2021, arXiv:2003.11666), propose two corrections for SGD with momentum
(``v ← m·v + g``, ``w ← w − η·v``), both reading the momentum ``v``:

* **spike compensation** — apply at once the part of the gradient that
  momentum would have applied during the ``D`` updates it was late:
  ``w ← w − η·(m^D·v + (1 − m^D)/(1 − m)·g)``;
* **linear weight prediction** — run the forward on the weights predicted
  ``D`` updates ahead along the momentum: ``ŵ = w − η·D·v``.

Both are written here from their definitions, since the paper's text was
not at hand to check against: with undelayed momentum a gradient moves the
weights by ``η·g·(1 + m + m² + …) = η·g/(1 − m)`` in all; delayed by ``D``
updates it has missed the first ``D`` terms, ``η·g·(1 − m^D)/(1 − m)``,
which spike compensation applies at once while leaving the rest,
``m^D·η·g/(1 − m)``, to the momentum — so the total is the same.  Linear
prediction assumes the velocity stays ``v`` over the next ``D`` updates.
Combined (``spike+predict``) both are applied as they are.

``D`` here is the stage's delay in updates, ``2(S−1−s)/k`` for stage ``s``
of ``S`` updating every ``k`` sub-minibatches (the paper's ``k = 1`` gives
the integer delay).  Both need ``torch.optim.SGD`` with momentum and
neither dampening nor Nesterov; other optimizers are refused.

The delay-aware learning-rate warm-up (PipeMare, Yang et al., MLSys 2021)
is ``learning_rate_factor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...knobs import ConfigError
from ...schedule.config import DELAY_CORRECTIONS as CORRECTIONS


def check_correction(correction: str, optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse, with ``ConfigError``, an unknown correction or one the optimizer cannot support.

    Corrections other than ``none`` read the momentum of ``torch.optim.SGD``
    with ``momentum > 0``, ``dampening = 0``, ``nesterov = False`` and
    ``maximize = False``; anything else is refused.
    """
    if correction not in CORRECTIONS:
        raise ConfigError("delay_correction", correction, "choose one of " + ", ".join(CORRECTIONS))
    if correction == "none" or optimizer is None:
        return
    plain_momentum = type(optimizer) is torch.optim.SGD and all(
        group["momentum"] > 0 and group["dampening"] == 0 and not group["nesterov"] and not group["maximize"]
        for group in optimizer.param_groups
    )
    if not plain_momentum:
        raise ConfigError(
            "delay_correction",
            correction,
            f"reads the momentum of torch.optim.SGD with momentum > 0, no dampening and no Nesterov; "
            f"the optimizer is {_describe(optimizer)}: use delay_correction='none' or such an SGD",
        )


def _describe(optimizer: torch.optim.Optimizer) -> str:
    if type(optimizer) is torch.optim.SGD:
        group = optimizer.param_groups[0]
        return f"SGD(momentum={group['momentum']}, dampening={group['dampening']}, nesterov={group['nesterov']})"
    return type(optimizer).__name__


def horizon(delay_ticks: int, update_every: int) -> float:
    """Return a stage's delay in its own updates: ``delay_ticks / update_every``."""
    return delay_ticks / update_every


def corrected_step(optimizer: torch.optim.Optimizer, correction: str, delay: float) -> None:
    """Step ``optimizer``, with spike compensation over ``delay`` updates when ``correction`` asks for it.

    Without spike compensation, or for a stage without delay, this is
    ``optimizer.step()``.  With it, each parameter with a gradient moves by
    ``−lr·(m^D·v + (1 − m^D)/(1 − m)·g)`` where ``g`` is its gradient (plus
    weight decay, as SGD adds it) and ``v`` the SGD momentum buffer updated
    with ``g`` as SGD would; the buffer is kept in the optimizer's state.
    """
    if "spike" not in correction or delay == 0:
        optimizer.step()
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            momentum, rate, decay = group["momentum"], group["lr"], group["weight_decay"]
            now = momentum**delay
            late = (1 - now) / (1 - momentum)
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                gradient = parameter.grad if decay == 0 else parameter.grad.add(parameter, alpha=decay)
                state = optimizer.state[parameter]
                velocity = state.get("momentum_buffer")
                if velocity is None:
                    velocity = state["momentum_buffer"] = gradient.detach().clone()
                else:
                    velocity.mul_(momentum).add_(gradient)
                parameter.add_(velocity * now + gradient * late, alpha=-rate)
    # This was the optimizer's step: say so as its wrapped ``step`` would, or a learning-rate scheduler stepped next
    # warns that it ran before any optimizer step (torch reads this flag).
    optimizer._opt_called = True


def predicted(parameters: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, delay: float) -> list[torch.Tensor]:
    """Return detached copies of ``parameters`` predicted ``delay`` updates ahead: ``w − lr·D·v``.

    A parameter without a momentum buffer yet (before its first update) is
    copied as it is.
    """
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    found = []
    with torch.no_grad():
        for parameter in parameters:
            velocity = optimizer.state.get(parameter, {}).get("momentum_buffer")
            copy = parameter.detach().clone()
            if velocity is not None and delay:
                copy.sub_(velocity, alpha=rates[id(parameter)] * delay)
            found.append(copy)
    return found


def learning_rate_factor(stale_updates: int, update: int, warmup: int) -> float:
    """Return the factor of a stage's learning rate at its ``update``-th update under the delay-aware warm-up.

    ``τ^-(1 - min(update / K, 1))`` for a stage whose gradients are ``τ =
    stale_updates`` updates stale and a warm-up of ``K = warmup`` updates:
    the rate starts at ``1/τ`` and reaches the optimizer's own at update
    ``K`` (PipeMare's learning-rate rescheduling, Yang et al., MLSys 2021, in
    the form of PluralisResearch/AsyncPP's ``adjust_learning_rate``).  1
    without a warm-up and for a stage at most one update stale.
    """
    if not warmup or stale_updates <= 1:
        return 1.0
    return float(stale_updates) ** -(1.0 - min(update / warmup, 1.0))
