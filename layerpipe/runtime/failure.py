"""Where a failure happened and what caused it, in one line.

The executor marks an exception with the action it was running
(``mark_action``) and a stage with the layer it was calling
(``mark_layer``); ``one_line`` reads those marks and the exception's chain
and returns ``at 1F2, in layer 3 (ReLU) of stage 1: ValueError: ...``,
which a ``LaunchError`` puts first.
"""

from __future__ import annotations

from torch import nn


def mark_layer(error: BaseException, index: int, layer: nn.Module, stage: int) -> None:
    """Note on ``error`` (once, the innermost call wins) that it came out of layer ``index`` of ``stage``."""
    if getattr(error, "layerpipe_layer", None) is None:
        error.layerpipe_layer = f"layer {index} ({type(layer).__name__}) of stage {stage}"


def mark_action(error: BaseException, action) -> None:
    """Note on ``error`` (once) the program action that was running when it was raised."""
    if getattr(error, "layerpipe_action", None) is None:
        error.layerpipe_action = str(action)


def one_line(error: BaseException) -> str:
    """Return where ``error`` happened (action, layer) and its original exception, in one line.

    The original exception is the one a layer raised when there is one in
    the chain, else the outermost (layerpipe's own errors lead with their
    cause; a communication error's PyTorch text follows it).
    """
    chain = _chain(error)
    from_layer = next((e for e in reversed(chain) if getattr(e, "layerpipe_layer", None)), None)
    action = next((e.layerpipe_action for e in chain if getattr(e, "layerpipe_action", None)), None)
    cause = from_layer or chain[0]
    message = first_line(str(cause))
    at = f"at {action}" if action and f" {action} " not in f" {message} " else ""  # unless the message says it
    where = ", ".join(part for part in (at, f"in {from_layer.layerpipe_layer}" if from_layer else "") if part)
    what = f"{type(cause).__name__}: {message}"
    return f"{where}: {what}" if where else what


def first_line(text: str) -> str:
    """Return the first non-empty line of ``text`` (empty when there is none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _chain(error: BaseException) -> list[BaseException]:
    """Return ``error`` and the exceptions it was raised from or during, outermost first."""
    chain, seen = [error], {id(error)}
    while True:
        inner = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if inner is None or id(inner) in seen:
            return chain
        chain.append(inner)
        seen.add(id(inner))
