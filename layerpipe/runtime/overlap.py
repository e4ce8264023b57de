"""Overlapped pairs in the executor: ``(0F3;3B1)OVERLAP_F_B`` runs its forward and its backward half.

By default the halves run one after the other, forward first, through the
executor's own ``F`` and ``B`` handlers.  ``register_overlap(function)``
makes every pair call ``function(forward, backward)`` instead, with the two
halves as callables that take no arguments, as torch's
``register_custom_function`` does for ``OVERLAP_F_B``: the function may run
them together, e.g. start one half's mixture-of-experts exchange while the
other computes.  It must call each half exactly once.  The registration is
per process (call it in the function ``layerpipe.launch`` runs, before the
first step); ``register_overlap(None)`` restores the default.

A function that raises, or does not run both halves, stops the run with an
``OverlapError`` that names the pair and the rank.
"""

from __future__ import annotations

from collections.abc import Callable

from ..schedule.actions import Action, Kind, halves
from .run_state import COMPUTE

OverlapFunction = Callable[[Callable[[], object], Callable[[], object]], object]
"""Takes the forward half and the backward half of a pair, as callables; runs each once."""

_REGISTERED: list[OverlapFunction | None] = [None]


class OverlapError(RuntimeError):
    """A registered overlap function raised, or did not run each half of its pair once."""


def register_overlap(function: OverlapFunction | None) -> None:
    """Run every overlapped pair of this process with ``function(forward, backward)``; ``None``: one after the other."""
    if function is not None and not callable(function):
        raise TypeError(f"register_overlap takes a function of (forward, backward) or None, not {function!r}")
    _REGISTERED[0] = function


def registered_overlap() -> OverlapFunction | None:
    """Return the overlap function registered in this process (``None``: the halves run one after the other)."""
    return _REGISTERED[0]


def run_pair(executor, action: Action, state) -> str:
    """The handler of ``OVERLAP_F_B``: run the pair's forward and backward halves with the executor's handlers."""
    forward, backward = halves(action)
    collectives = executor.collectives
    if (backward.stage, Kind.GATHER) in collectives.pending:  # the executor waited for the forward half's stage
        collectives.wait(backward.stage, Kind.GATHER, action)
    handlers = executor.HANDLERS
    function = _REGISTERED[0]
    if function is None:
        handlers[Kind.F](executor, forward, state)
        handlers[Kind.B](executor, backward, state)
        return COMPUTE
    ran = {forward: 0, backward: 0}

    def half(which: Action) -> Callable[[], None]:
        def run() -> None:
            ran[which] += 1
            handlers[which.kind](executor, which, state)

        return run

    where = f"rank {executor.context.rank}: the overlap function {getattr(function, '__name__', function)!s}"
    try:
        function(half(forward), half(backward))
    except Exception as error:
        raise OverlapError(f"{where} raised on {action} ({type(error).__name__}: {error})") from error
    wrong = [f"{which} ran {count} times" for which, count in ran.items() if count != 1]
    if wrong:
        raise OverlapError(f"{where} must run each half of {action} once: " + ", ".join(wrong))
    return COMPUTE
