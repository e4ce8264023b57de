"""A stage: a contiguous run of the user's layers, and the tensors that cross its boundaries.

A layer may return one tensor or a tuple of tensors; a tuple is passed to
the next layer as separate arguments.  Anything else (a dict, a list,
``None``) is refused naming the layer: what crosses a stage boundary is a
numbered list of tensors.  Stages therefore take and return
tuples of tensors, and ``TensorMeta`` describes one tensor crossing a stage
boundary (agreed between ranks on the first step, checked afterwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .failure import mark_layer


class PipelineError(RuntimeError):
    """Something went wrong while running a pipeline program; the message names rank, action and peer."""


class TensorMeta(NamedTuple):
    """Shape and dtype of one tensor crossing a stage boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


def layer_list(layers) -> list[nn.Module]:
    """Return the user's layers as a list: from an ``nn.Sequential``, an ``nn.ModuleList`` or a sequence of modules.

    Refuses, with ``TypeError`` saying how to give layers, a single model
    object and anything that is not modules.
    """
    if isinstance(layers, (nn.Sequential, nn.ModuleList)):
        return list(layers.children())
    given = layers
    try:
        layers = None if isinstance(layers, nn.Module) else list(layers)
    except TypeError:
        layers = None
    if layers is None:
        raise TypeError(
            f"layers: a {type(given).__name__}, not a list of layers; give the model as a list of nn.Module (or an "
            f"nn.Sequential) whose layers each take the previous one's output, e.g. list(model.children()) when "
            f"its forward calls them in order (see docs/one-process.md)"
        )
    for index, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layers[{index}]: a {type(layer).__name__}; every layer must be an nn.Module")
    return layers


def check_layer_output(value, index: int, layer: nn.Module, stage: int) -> None:
    """Refuse, with ``PipelineError`` naming the layer, an output other than a tensor or a tuple of tensors."""
    if isinstance(value, tuple) and all(isinstance(item, torch.Tensor) for item in value):
        return
    found = _described(value)
    if isinstance(value, tuple):
        found = f"a tuple holding {next(_described(i) for i in value if not isinstance(i, torch.Tensor))}"
    advice = (
        "; return its values as a tuple, in the order the next layer takes them as arguments"
        if isinstance(value, dict)
        else ""
    )
    raise PipelineError(
        f"layer {index} ({type(layer).__name__}) of stage {stage} returned {found}: a layer must return a tensor "
        f"or a tuple of tensors{advice}"
    )


def _described(value) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def as_tuple(value) -> tuple:
    """Return ``value`` as a tuple of tensors (a single tensor becomes a 1-tuple)."""
    return value if isinstance(value, tuple) else (value,)


def metas_of(tensors: Sequence[torch.Tensor]) -> tuple[TensorMeta, ...]:
    """Return the ``TensorMeta`` of each tensor."""
    return tuple(TensorMeta(tuple(t.shape), t.dtype) for t in tensors)


class UnevenMetas(tuple):
    """Every stage's output metas for a batch whose last micro-batch is smaller or larger than the others.

    As a tuple it is the metas of the other micro-batches (``metas[stage]``);
    ``last`` holds those of micro-batch ``last_microbatch``, and
    ``loss_weights`` what each micro-batch's mean loss is multiplied by so
    that their mean is the mean over every sample.
    """

    last: tuple
    last_microbatch: int
    loss_weights: tuple[float, ...]

    def __new__(cls, metas: tuple, last: tuple, sizes: tuple[int, ...]):
        made = super().__new__(cls, metas)
        made.last, made.last_microbatch = last, len(sizes) - 1
        made.loss_weights = tuple(size * len(sizes) / sum(sizes) for size in sizes)
        return made


class ListedMetas(tuple):
    """The metas of a list of micro-batches (``microbatch_lists``): as a tuple, the agreed metas when every
    micro-batch of the list has one shape, else empty, as every message then announces its own shapes
    (``p2p.Mailbox``); ``loss_weights`` is what each micro-batch's mean loss is multiplied by so that the step's
    loss is the mean over every counted token of the step."""

    loss_weights: tuple[float, ...]

    def __new__(cls, loss_weights: tuple[float, ...], agreed: tuple = ()):
        made = super().__new__(cls, agreed)
        made.loss_weights = loss_weights
        return made


def stage_metas(metas: tuple, stage: int, microbatch: int) -> tuple[TensorMeta, ...]:
    """Return stage ``stage``'s output metas for micro-batch ``microbatch`` (``None``: announced by each message)."""
    if type(metas) is ListedMetas and not metas:
        return None
    if type(metas) is UnevenMetas and microbatch == metas.last_microbatch:
        return metas.last[stage]
    return metas[stage]


def uneven_key(metas: tuple):
    """Return what tells uneven metas apart from the even ones they equal as tuples (``None`` for even ones;
    one key for every list of micro-batches, whose mailbox is handed each run's metas)."""
    if type(metas) is ListedMetas:
        return "listed"
    return (metas.last, metas.loss_weights) if type(metas) is UnevenMetas else None


def carries_gradient(dtype: torch.dtype) -> bool:
    """Return whether a tensor of this dtype carries a gradient between stages (floating point and complex do)."""
    return dtype.is_floating_point or dtype.is_complex


def backward_roots(outputs: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> tuple[list, list]:
    """Return the outputs to differentiate and their incoming gradients.

    ``gradients`` holds one gradient per floating output of the stage, in
    order (what the next stage sent back); outputs that need no gradient
    are dropped with theirs.
    """
    tensors, incoming = [], []
    for tensor, gradient in zip((t for t in outputs if carries_gradient(t.dtype)), gradients):
        if tensor.requires_grad:
            tensors.append(tensor)
            incoming.append(gradient)
    return tensors, incoming


class Stage(nn.Module):
    """Layers ``first .. first+len(layers)-1`` of the model, run in order.

    Parameters are named ``"<layer index>.<name>"`` as in
    ``nn.Sequential(*all_layers)``.
    """

    def __init__(self, index: int, first: int, layers: Sequence[nn.Module]):
        super().__init__()
        self.index = index
        self.first = first
        self.layers = nn.ModuleList(layers)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        value = inputs
        for offset, layer in enumerate(self.layers):
            try:
                value = layer(*value) if isinstance(value, tuple) else layer(value)
            except Exception as error:
                mark_layer(error, self.first + offset, layer, self.index)
                raise
            if not isinstance(value, torch.Tensor):
                check_layer_output(value, self.first + offset, layer, self.index)
        return as_tuple(value)

    def named_model_parameters(self, remove_duplicate: bool = True):
        """Yield ``(name, parameter)`` with names as in ``nn.Sequential`` over the whole model.

        A parameter held by several of the stage's layers (or twice by one) comes once, under its first name, as
        ``nn.Module.named_parameters`` gives it: it is one slot of the stage's buffers and one entry of its
        optimizer.  ``remove_duplicate=False`` yields every name, as ``state_dict`` lists them.
        """
        seen = set()
        for offset, layer in enumerate(self.layers):
            for name, parameter in layer.named_parameters(remove_duplicate=False):
                if remove_duplicate and id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                yield f"{self.first + offset}.{name}", parameter

    def stored_names(self) -> dict[str, str]:
        """Return, for every name of the stage's parameters, the name it is stored under: its first (itself unless
        the parameter is shared)."""
        first: dict[int, str] = {}
        return {
            name: first.setdefault(id(parameter), name)
            for name, parameter in self.named_model_parameters(remove_duplicate=False)
        }


# A header describes the tensors of a boundary: count, then per tensor dtype code, rank and sizes.
HEADER_LENGTH = 256
_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)


def encode_header(metas: Sequence[TensorMeta]) -> torch.Tensor:
    """Return an int64 tensor of ``HEADER_LENGTH`` describing ``metas``.

    Refuses a dtype outside the supported list and a description too long
    for the header, with ``PipelineError``.
    """
    words = [len(metas)]
    for meta in metas:
        if meta.dtype not in _DTYPES:
            raise PipelineError(
                f"a stage output has dtype {meta.dtype}, which layerpipe cannot send "
                f"(supported: {', '.join(str(d) for d in _DTYPES)})"
            )
        words += [_DTYPES.index(meta.dtype), len(meta.shape), *meta.shape]
    if len(words) > HEADER_LENGTH:
        raise PipelineError(
            f"a stage passes {len(metas)} tensors whose description does not fit in "
            f"{HEADER_LENGTH} words: pass fewer tensors between stages"
        )
    return torch.tensor(words + [0] * (HEADER_LENGTH - len(words)), dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[TensorMeta, ...]:
    """Return the metas that ``encode_header`` wrote."""
    words = header.tolist()
    count, position, metas = words[0], 1, []
    for _ in range(count):
        dtype, ndim = _DTYPES[words[position]], words[position + 1]
        shape = tuple(words[position + 2 : position + 2 + ndim])
        metas.append(TensorMeta(shape, dtype))
        position += 2 + ndim
    return tuple(metas)
