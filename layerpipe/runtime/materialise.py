"""Layers built on the ``meta`` device, materialised where they are owned, with weights that do not depend on the layout.

A layer whose parameters or buffers are on the ``meta`` device holds shapes
and dtypes but no memory.  ``materialise_layer`` gives it storage on a
device (``to_empty``) and initialises it by its own rule under a random
generator seeded from ``(seed, layer index)`` alone, so any number of ranks,
stages per rank or partition gives the same weights, and ``materialise``
(every layer, one process) gives them too: it is the reference.

The rule of a layer, the first that applies:

* ``layer.initialise_module``: a callable applied to each of the layer's
  submodules (``layerpipe.hf.split`` sets the model's own ``_init_weights``);
* ``layer.reset_parameters()`` on the layer itself, which then answers for
  all its tensors;
* ``reset_parameters()`` of every submodule that has one, each tensor's own
  module must have one (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``,
  ``nn.Conv2d``, ``nn.BatchNorm2d`` ... do).

A meta tensor that no rule covers is refused, before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ..knobs import ConfigError


def is_meta(layer: nn.Module) -> bool:
    """Return whether any parameter or buffer of ``layer`` is on the meta device."""
    return any(tensor.is_meta for tensor in itertools.chain(layer.parameters(), layer.buffers()))


def layer_seed(seed: int, index: int) -> int:
    """Return the seed of layer ``index``'s initialisation: a hash of ``(seed, index)``, the same in every process."""
    digest = hashlib.sha256(f"layerpipe-layer:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_initialisable(layers: Sequence[nn.Module]) -> None:
    """Refuse, with ``ConfigError`` in one line naming the layer, its class and the tensor, a meta tensor no rule covers."""
    for index, layer in enumerate(layers):
        _check_layer(index, layer)


def _check_layer(index: int, layer: nn.Module) -> None:
    """Refuse, as ``check_initialisable``, layer ``index`` when a meta tensor of it has no rule."""
    if not is_meta(layer) or _own_rule(layer) is not None:
        return
    for module_name, module in layer.named_modules():
        if callable(getattr(module, "reset_parameters", None)):
            continue
        tensors = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if tensor.is_meta:
                where = f"{module_name}.{name}" if module_name else name
                raise ConfigError(
                    "layers",
                    f"[{index}] {type(layer).__name__}",
                    f"its tensor {where!r} (of {type(module).__name__}) is on the meta device and nothing "
                    f"initialises it: give {type(module).__name__} or the layer a reset_parameters() method "
                    f"(or an initialise_module(submodule) attribute), or build the layer on a real device",
                )


def materialise_layer(layer: nn.Module, index: int, seed: int, device: torch.device | str) -> nn.Module:
    """Give meta layer ``index`` storage on ``device`` and initialise it by its rule under ``layer_seed(seed, index)``.

    Returns the layer (changed in place; a layer with no meta tensor is left as it is).  The caller's random
    state is left unchanged.  Refuses, as ``check_initialisable``, a meta tensor no rule covers.
    """
    if not is_meta(layer):
        return layer
    _check_layer(index, layer)
    device = torch.device(device)
    layer.to_empty(device=device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, device_type=device.type), torch.no_grad():
        torch.manual_seed(layer_seed(seed, index))
        _initialise(layer)
    return layer


def materialise(layers: Sequence[nn.Module], seed: int = 0, device: torch.device | str = "cpu") -> Sequence[nn.Module]:
    """Materialise every meta layer on ``device`` in one process; return ``layers`` (changed in place).

    The reference a ``Pipeline(layers, ..., seed=seed)`` of any layout equals:
    each layer initialised as ``materialise_layer`` does.  Refuses, with
    ``ConfigError`` naming it, a meta layer without an initialisation rule
    (before any layer is touched).
    """
    check_initialisable(layers)
    shared = shared_meta_parameters(layers)
    for index, layer in enumerate(layers):
        materialise_layer(layer, index, seed, device)
    retie(layers, shared, range(len(layers)), seed, device)
    return layers


def shared_meta_parameters(layers: Sequence[nn.Module]) -> list[list[tuple[int, str]]]:
    """Return, for each meta parameter held under more than one name, its holders ``(layer index, name)`` in order.

    Found before materialising: ``to_empty`` gives every holder a tensor of its own, which ``retie`` undoes.
    """
    holders: dict[int, list[tuple[int, str]]] = {}
    for index, layer in enumerate(layers):
        for name, parameter in layer.named_parameters(remove_duplicate=False):
            if parameter.is_meta:
                holders.setdefault(id(parameter), []).append((index, name))
    return [found for found in holders.values() if len(found) > 1]


def retie(layers: Sequence[nn.Module], shared: list, indices, seed: int, device: torch.device | str) -> None:
    """Point every materialised holder among layers ``indices`` of each ``shared`` parameter at one ``nn.Parameter``
    whose value is what its first holder's rule gives (materialised from a copy of that layer where it is not here),
    so a tied parameter starts as in one process whichever layers this process holds."""
    local = set(indices)
    for holders in shared:
        here = [(index, name) for index, name in holders if index in local]
        if not here:
            continue
        first, first_name = holders[0]
        if first in local:
            value = layers[first].get_parameter(first_name)
        else:
            source = materialise_layer(copy.deepcopy(layers[first]), first, seed, device).get_parameter(first_name)
            value = nn.Parameter(source.detach(), requires_grad=source.requires_grad)
        for index, name in here:
            owner, _, leaf = name.rpartition(".")
            setattr(layers[index].get_submodule(owner), leaf, value)


def _own_rule(layer: nn.Module):
    """Return the layer's own rule for all its tensors (``initialise_module`` or its ``reset_parameters``), if any."""
    rule = getattr(layer, "initialise_module", None)
    if callable(rule):
        return lambda: [rule(module) for module in layer.modules()]
    reset = getattr(layer, "reset_parameters", None)
    return reset if callable(reset) else None


def _initialise(layer: nn.Module) -> None:
    """Run the layer's rule: its own, or every submodule's ``reset_parameters`` in module order."""
    rule = _own_rule(layer)
    if rule is not None:
        rule()
        return
    for module in layer.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


@dataclasses.dataclass(frozen=True)
class Initialisation:
    """Where the weights of the layers a process owns come from: ``seed`` for meta layers, then ``init_from``.

    ``init_from``: a folder written by Hugging Face's ``save_pretrained``, for layers of ``layerpipe.hf.split``
    (see ``layerpipe.hf_weights``).
    """

    seed: int = 0
    init_from: str | None = None

    def check(self, layers: Sequence[nn.Module]) -> None:
        """Refuse, with ``ConfigError`` in one line, a meta layer without a rule and a folder that does not fit."""
        check_initialisable(layers)
        if self.init_from is not None:
            from ..hf_weights import check_folder

            check_folder(layers, self.init_from)

    def apply(self, layers: Sequence[nn.Module], indices: Sequence[int], device: torch.device) -> None:
        """Materialise layers ``indices`` on ``device`` and load their tensors from ``init_from``, if given."""
        shared = shared_meta_parameters(layers)
        for index in indices:
            materialise_layer(layers[index], index, self.seed, device)
        retie(layers, shared, indices, self.seed, device)
        if self.init_from is not None:
            from ..hf_weights import load_layers

            load_layers(layers, self.init_from, indices)
