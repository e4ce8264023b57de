"""Learning-rate schedulers: one per stage optimizer, built by the caller's callable, stepped when that optimizer steps.

``Pipeline(..., optimizer=..., scheduler=fn)`` calls ``fn(optimizer)`` once
per local stage optimizer and keeps what it returns
(``torch.optim.lr_scheduler.LRScheduler``) in ``pipe.schedulers``.  The rule
is torch's own: a scheduler steps exactly when its optimizer steps — after
each ``STEP`` of a flushed schedule, after each stage's update in the async
stream — and not for a step the guard or a non-finite clip norm skipped (as
a step ``torch.amp.GradScaler`` skips never calls ``optimizer.step()``).
So after ``k`` clean steps every stage's learning rate is what one process
with the same optimizer and scheduler shows after ``k`` steps.

Checkpoints store each scheduler's ``state_dict()`` as JSON (numbers,
strings, lists: nothing unpickled) by stage index; ``scheduler_states`` and
``load_scheduler_states`` are that half.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from ..checkpoint_files import CheckpointError
from ..knobs import ConfigError

VALID = "give a callable(optimizer) -> torch.optim.lr_scheduler.LRScheduler built on the optimizer it is given"
"""What a valid ``scheduler`` is, said in every refusal."""


class _Named(str):
    """A callable's name, shown in an error as it is (``scheduler=warmup``, not ``scheduler='warmup'``)."""

    def __repr__(self) -> str:
        return str(self)


def _name(scheduler: object) -> _Named:
    return _Named(getattr(scheduler, "__qualname__", None) or type(scheduler).__name__)


def check_scheduler(scheduler: object, optimizer: object) -> None:
    """Refuse, with ``ConfigError`` on ``scheduler``, one that is not callable or comes without an ``optimizer``.

    Run before any process group starts; what the callable returns is checked by ``build_schedulers``.
    """
    if scheduler is None:
        return
    if not callable(scheduler):
        raise ConfigError("scheduler", scheduler, f"not callable: {VALID}")
    if optimizer is None:
        raise ConfigError(
            "scheduler", _name(scheduler), "needs `optimizer`: a scheduler sets the learning rate of a stage optimizer"
        )


def build_schedulers(
    scheduler: Callable | None, optimizers: dict[int, torch.optim.Optimizer]
) -> dict[int, LRScheduler]:
    """Return ``scheduler(optimizer)`` for each stage optimizer, by stage index (empty without a ``scheduler``).

    Refuses, with ``ConfigError`` on ``scheduler`` in one line naming the
    stage: a callable that raises (with the original exception), one that
    returns no ``LRScheduler`` (naming the type returned), a
    ``ReduceLROnPlateau`` (it steps on a metric the pipeline has not), and a
    scheduler built on another optimizer (it would set nobody's rate).
    """
    if scheduler is None:
        return {}
    built = {}
    for index, optimizer in sorted(optimizers.items()):
        try:
            found = scheduler(optimizer)
        except Exception as error:
            message = " ".join(str(error).split())
            raise ConfigError(
                "scheduler", _name(scheduler), f"raised {type(error).__name__}({message}) for stage {index}; {VALID}"
            ) from error
        _check_built(scheduler, found, optimizer, index)
        built[index] = found
    return built


def _check_built(scheduler: Callable, found: object, optimizer: torch.optim.Optimizer, index: int) -> None:
    """Refuse what ``scheduler`` returned for stage ``index`` unless it is a scheduler of ``optimizer`` stepped alone."""
    if not isinstance(found, LRScheduler):
        raise ConfigError("scheduler", _name(scheduler), f"returned {type(found).__name__} for stage {index}; {VALID}")
    if isinstance(found, ReduceLROnPlateau):
        raise ConfigError(
            "scheduler",
            _name(scheduler),
            f"returned ReduceLROnPlateau for stage {index}, which steps on a metric the pipeline does not pass; "
            "use a scheduler stepped by steps alone (LambdaLR, StepLR, CosineAnnealingLR, SequentialLR, ...)",
        )
    if found.optimizer is not optimizer:
        raise ConfigError(
            "scheduler", _name(scheduler), f"returned a scheduler of another optimizer for stage {index}; {VALID}"
        )


def step_scheduler(scheduler: LRScheduler | None) -> None:
    """Step a stage's scheduler (its optimizer just stepped); nothing without one."""
    if scheduler is not None:
        scheduler.step()


# ---------------------------------------------------------------- checkpoints
def scheduler_states(schedulers: dict[int, LRScheduler]) -> dict[str, dict]:
    """Return each scheduler's ``state_dict()`` as JSON-ready values, by stage index (as text).

    Refuses, with ``CheckpointError`` naming the stage and key, a state
    JSON cannot hold exactly (a tensor learning rate, an object).
    """
    return {
        str(index): {key: _json_value(value, index, key) for key, value in scheduler.state_dict().items()}
        for index, scheduler in sorted(schedulers.items())
    }


def load_scheduler_states(schedulers: dict[int, LRScheduler], states: dict[str, dict], where: str) -> None:
    """Load ``scheduler_states``'s values into the schedulers of the same stages.

    Refuses, with ``CheckpointError`` naming ``where`` (the checkpoint) and
    the stage, a stage whose scheduler has no saved state: the checkpoint
    was written without ``scheduler``, or by a pipeline of other stages.
    """
    for index, scheduler in sorted(schedulers.items()):
        state = states.get(str(index))
        if state is None:
            raise CheckpointError(
                f"checkpoint {where}: no scheduler state for stage {index} (saved without `scheduler`, "
                f"or with {len(states)} scheduled stages)"
            )
        scheduler.load_state_dict(state)


def _json_value(value, index: int, key: str):
    """Return ``value`` as JSON holds it (tuples as lists); refuse what JSON cannot hold exactly."""
    if isinstance(value, (list, tuple)):
        return [_json_value(item, index, key) for item in value]
    if isinstance(value, dict) and all(isinstance(name, str) for name in value):
        return {name: _json_value(item, index, key) for name, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(
        f"stage {index}'s scheduler state {key!r} holds a {type(value).__name__}, which a checkpoint stores only "
        "as JSON (numbers, text, lists, tables)"
    )
