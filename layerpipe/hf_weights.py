"""Hugging Face weight folders: loaded into ``layerpipe.hf.split`` layers tensor by tensor, and written back.

A folder written by ``save_pretrained`` holds ``config.json`` and either
``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
Each layer of ``split`` names its tensors' Hugging Face names
(``layer.hf_names``), so a process reads only the tensors of the layers it
owns (safetensors' ``safe_open``, one tensor at a time) and checks the whole
folder against the whole model from the files' headers alone.  ``export``
writes a layerpipe checkpoint back as such a folder, which
``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Only safetensors and json are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .knobs import ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def is_hf_folder(folder: str) -> bool:
    """Return whether ``folder`` holds a ``save_pretrained`` folder's weights (``model.safetensors`` or its index)."""
    return os.path.isfile(os.path.join(folder, SINGLE)) or os.path.isfile(os.path.join(folder, INDEX))


def folder_tensors(folder: str) -> dict[str, str]:
    """Return the folder's tensors: each Hugging Face name with the safetensors file that holds it.

    Refuses, with ``ConfigError`` on ``init_from``, a folder with neither
    ``model.safetensors`` nor ``model.safetensors.index.json`` and an index
    naming a file that is not there.
    """
    from safetensors import safe_open

    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map", {})
        files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise ConfigError("init_from", folder, f"its {INDEX} names {os.path.basename(file)}, which is missing")
        return files
    single = os.path.join(folder, SINGLE)
    if not os.path.isfile(single):
        raise ConfigError(
            "init_from", folder, f"holds neither {SINGLE} nor {INDEX} (give a folder written by save_pretrained)"
        )
    with safe_open(single, framework="pt") as opened:
        return {name: single for name in opened.keys()}


def layer_names(layer: nn.Module, index: int) -> dict[str, str]:
    """Return the Hugging Face name of each tensor of ``layer.state_dict()``; refuse a layer ``split`` did not make."""
    names = getattr(layer, "hf_names", None)
    if names is None:
        raise ConfigError(
            "init_from",
            f"layer {index} ({type(layer).__name__})",
            "has no Hugging Face names: build the layers with layerpipe.hf.split(model)",
        )
    return names


def check_folder(layers: Sequence[nn.Module], folder: str) -> None:
    """Refuse, with ``ConfigError`` on ``init_from`` in one line naming the tensor, a folder that does not fit ``layers``.

    Every tensor of every layer must be in the folder with the layer's shape
    (a tied model's folder may hold the input embedding for the head's copy),
    and every tensor of the folder must belong to a layer.  Reads the files'
    headers only.
    """
    files = folder_tensors(folder)
    shapes = _shapes(files)
    used = set()
    for index, layer in enumerate(layers):
        for local, tensor, name in _named(layer, index, files):
            if name is None:
                wanted = layer_names(layer, index)[local]
                raise ConfigError("init_from", folder, f"has no tensor {wanted} (layer {index}'s {local})")
            used.add(name)
            if name not in shapes:
                raise ConfigError("init_from", folder, f"its {INDEX} puts {name} in a file that does not hold it")
            if shapes[name] != tuple(tensor.shape):
                raise ConfigError(
                    "init_from",
                    folder,
                    f"holds {name} of shape {shapes[name]}, layer {index}'s {local} is {tuple(tensor.shape)}: "
                    f"the folder is of another model configuration",
                )
    for name in files:
        if name not in used:
            raise ConfigError("init_from", folder, f"holds {name}, which no layer of this model has")


def load_layers(layers: Sequence[nn.Module], folder: str, indices: Iterable[int] | None = None) -> None:
    """Copy the folder's tensors into ``layers[i]`` for each ``i`` of ``indices`` (default: all), converting dtypes.

    Reads only those layers' tensors, one at a time.  Check the folder with ``check_folder`` first (this
    refuses, as it does, a tensor it cannot find).
    """
    from safetensors import safe_open

    files = folder_tensors(folder)
    wanted = range(len(layers)) if indices is None else indices
    with torch.no_grad():
        for index in wanted:
            by_file: dict[str, list] = {}
            for local, tensor, name in _named(layers[index], index, files):
                if name is None:
                    raise ConfigError("init_from", folder, f"has no tensor for layer {index}'s {local}")
                by_file.setdefault(files[name], []).append((tensor, name))
            for file, pairs in by_file.items():
                with safe_open(file, framework="pt", device="cpu") as opened:
                    for tensor, name in pairs:
                        tensor.copy_(opened.get_tensor(name))


def _named(layer: nn.Module, index: int, files: dict[str, str]):
    """Yield ``(local name, tensor, folder name or None)`` for each tensor of the layer's state dict."""
    names = layer_names(layer, index)
    fallback = getattr(layer, "hf_fallback", {})
    for local, tensor in layer.state_dict(keep_vars=True).items():
        name = names[local]
        if name not in files:
            name = fallback.get(local) if fallback.get(local) in files else None
        yield local, tensor, name


def _shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Return each tensor's shape from its file's header (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as opened:
            for name in opened.keys():
                shapes[name] = tuple(opened.get_slice(name).get_shape())
    return shapes
