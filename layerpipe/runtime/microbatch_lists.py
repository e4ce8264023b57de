"""Lists of micro-batches: a step given as its micro-batches, whose shapes may differ (a sequence length each).

``train_step`` and ``eval_step`` take, beside one batch (a tensor or a
tuple of tensors, split into equal micro-batches), a Python ``list`` of the
step's ``microbatches × data_parallel`` micro-batches and a ``list`` of
their targets: replica ``d`` runs items ``d·m … d·m + m - 1``, as it takes
the ``d``-th share of a batch tensor.  Every process passes the same lists.

Shapes: when the list's micro-batches differ in shape, no shapes are
agreed; every activation and gradient message announces its own, a header
of its tensors' shapes and dtypes sent before them (``p2p.Mailbox``), so a
length met for the first time costs no pass through the pipeline and no
rank waits on a wrong size.  A list of one shape is agreed as a batch is
(``shapes.py``), and sends no header.

Loss: the step's loss is the mean over every counted token of the step, as
one process computes it on all the micro-batches at once:
``sum_i n_i · loss_i / sum_i n_i``, where ``loss_i`` is ``loss_fn``'s mean
over micro-batch ``i`` and ``n_i`` its count of targets that are not
``IGNORE_INDEX`` (integer targets, as ``torch.nn.functional.cross_entropy``
ignores them by default) or of target elements (floating-point targets).
Micro-batches of equal counts weigh ``1/m`` each, as a batch tensor's do.
A ``loss_fn`` that averages over other targets (shifted labels, say) says
how many with an attribute ``loss_fn.counted_targets = callable(target) ->
int``, as ``layerpipe.hf.causal_lm_loss`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""The target value that counts no token (``torch.nn.functional.cross_entropy``'s default ``ignore_index``)."""


@dataclass(frozen=True)
class ListedStep:
    """A checked list of micro-batches: ``everyone``'s inputs (every replica's, in list order), this replica's
    ``inputs`` and ``targets`` (``None`` without targets), and each of this replica's loss weights."""

    everyone: list[tuple[torch.Tensor, ...]]
    inputs: list[tuple[torch.Tensor, ...]]
    targets: list[tuple[torch.Tensor, ...]] | None
    loss_weights: tuple[float, ...]


def is_listed(inputs, targets=None) -> bool:
    """Return whether the step is given as a list of micro-batches (the inputs or the targets are a ``list``)."""
    return isinstance(inputs, list) or isinstance(targets, list)


def listed_step(
    inputs, targets, microbatches: int, replicas: int, replica: int, count: Callable | None = None
) -> ListedStep:
    """Return replica ``replica``'s part of a checked list of micro-batches, with its loss weights.

    ``count(target) -> int``: how many targets ``loss_fn`` averages over (its
    ``counted_targets`` attribute); by default ``counted_tokens``.

    Refuses, with ``ValueError`` in one line: inputs and targets not both
    lists, lists of different lengths or of another length than
    ``microbatches × replicas``, an item that is not a tensor or a tuple of
    tensors, a target whose batch size (or, where the micro-batches' lengths
    differ, whose sequence length) is not its micro-batch's, and a
    micro-batch with no counted target.
    """
    expected = microbatches * replicas
    items = _checked_list(inputs, "inputs", expected, targets)
    labels = _checked_list(targets, "targets", expected, inputs) if targets is not None else None
    if labels is not None:
        _check_targets_match(items, labels)
    share = slice(replica * microbatches, (replica + 1) * microbatches)
    weights = (1.0,) * microbatches
    if labels is not None:
        counts = [counted_tokens(label, index, count) for index, label in enumerate(labels)]
        weights = tuple(count * expected / sum(counts) for count in counts[share])
    return ListedStep(items, items[share], labels[share] if labels is not None else None, weights)


def counted_tokens(target: tuple[torch.Tensor, ...], index: int = 0, count: Callable | None = None) -> int:
    """Return how many targets of a micro-batch count in its mean loss: ``count`` of the target as ``loss_fn``
    takes it, or by default the first target's elements (floating point) or those not ``IGNORE_INDEX``.

    Refuses, with ``ValueError``, a micro-batch that counts none or a ``count`` that returns no whole number.
    """
    first = target[0]
    if count is not None:
        found = count(first if len(target) == 1 else target)
        found = int(found) if isinstance(found, (int, torch.Tensor)) and not isinstance(found, bool) else None
        if found is None or found < 0:
            raise ValueError(f"loss_fn.counted_targets: must return a whole number of targets for targets[{index}]")
        count = found
    else:
        count = int((first != IGNORE_INDEX).sum()) if not first.is_floating_point() else first.numel()
    if count == 0:
        raise ValueError(
            f"targets[{index}]: no counted target (all are the ignore index {IGNORE_INDEX}); its mean loss is "
            f"undefined: leave the micro-batch out of the list"
        )
    return count


def all_tensors(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Return every tensor of the list's micro-batches, in order (what the batch checksum sums)."""
    return tuple(tensor for item in items for tensor in item)


def _checked_list(value, name: str, expected: int, other) -> list[tuple[torch.Tensor, ...]]:
    """Return the list's items as tuples of tensors; refuse a list of the wrong form or length."""
    other_name = "targets" if name == "inputs" else "inputs"
    if not isinstance(value, list):
        raise ValueError(
            f"{name}: a {type(value).__name__}, but the {other_name} are a list of micro-batches: give both as "
            f"lists (one item per micro-batch) or both as one batch (a tuple, not a list, holds a batch's tensors)"
        )
    if isinstance(other, list) and len(value) != len(other):
        inputs, targets = (value, other) if name == "inputs" else (other, value)
        raise ValueError(
            f"targets: a list of {len(targets)}, but {len(inputs)} micro-batches of inputs: give one target each"
        )
    if len(value) != expected:
        raise ValueError(
            f"{name}: a list of {len(value)} micro-batches; the step runs microbatches × data_parallel = {expected} "
            f"(a tuple, not a list, holds the tensors of one batch)"
        )
    items = [item if isinstance(item, tuple) else (item,) for item in value]
    for index, item in enumerate(items):
        if not item or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in item):
            raise ValueError(f"{name}[{index}]: must be a tensor or a tuple of tensors, each with a batch dimension")
    return items


def _check_targets_match(items: list[tuple], labels: list[tuple]) -> None:
    """Refuse a target whose batch size, or (where the micro-batches' lengths differ) sequence length, is not its
    micro-batch's."""
    lengths = {item[0].shape[1] if item[0].dim() > 1 else None for item in items}
    for index, (item, label) in enumerate(zip(items, labels)):
        first = item[0]
        for target in label:
            if target.shape[0] != first.shape[0]:
                raise ValueError(
                    f"targets[{index}]: a batch of {target.shape[0]} samples, but inputs[{index}] has "
                    f"{first.shape[0]}: give one target per sample"
                )
            if len(lengths) > 1 and (target.dim() < 2 or target.shape[1] != first.shape[1]):
                raise ValueError(
                    f"targets[{index}]: shape {tuple(target.shape)}, but inputs[{index}] has sequence length "
                    f"{first.shape[1]} (shape {tuple(first.shape)}): give each micro-batch targets of its own length"
                )
