"""A layerpipe checkpoint of ``layerpipe.hf.split`` layers, written back as a folder ``transformers`` loads.

``export(checkpoint, model, folder)`` maps every checkpoint tensor
``"<layer>.<name>"`` to its Hugging Face name through ``split(model)`` and
writes ``config.json`` and ``model.safetensors`` as ``save_pretrained``
does: ``AutoModelForCausalLM.from_pretrained(folder)`` then gives the
trained model.  ``model`` only supplies the configuration and the names: a
model built on the meta device will do (``build_on_meta``).
"""

from __future__ import annotations

import copy
import json
import os

import torch

from .hf_weights import SINGLE, layer_names
from .knobs import ConfigError


def build_on_meta(config_path: str):
    """Return the causal LM of a Hugging Face ``config.json`` (a file, or a folder holding one), on the meta device.

    Refuses, with ``ConfigError`` on ``config``, a path that holds no such file.
    """
    import transformers

    path = os.path.join(config_path, "config.json") if os.path.isdir(config_path) else config_path
    if not os.path.isfile(path):
        raise ConfigError("config", config_path, "give a Hugging Face config.json, or a folder holding one")
    with open(path, encoding="utf-8") as handle:
        values = json.load(handle)
    if "model_type" not in values:
        raise ConfigError("config", config_path, "has no model_type: give a config.json written by transformers")
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def export(checkpoint: str, model, folder: str, untie: bool = False) -> str:
    """Write the weights of a layerpipe checkpoint of ``split(model, untie)`` as a ``save_pretrained`` folder; return it.

    ``checkpoint``: a step folder or a run's output folder (its latest step).  The folder gets ``config.json``
    (the model's, with ``tie_word_embeddings`` off when the head was untied, and the weights' dtype) and
    ``model.safetensors``, each written whole or not at all.  Refuses, with ``ConfigError`` in one line naming the
    tensor, a checkpoint that lacks a tensor of the model, holds one it does not have, or of another shape.
    """
    from .checkpoint_files import CheckpointError, find_checkpoint
    from .hf import split
    from .runtime.checkpoint import load_weights

    layers = split(model, untie=untie)  # the model's class and tie first: refused before any file is read
    found = find_checkpoint(checkpoint)
    if found is None:
        raise ConfigError("checkpoint", checkpoint, "holds no complete checkpoint (a step-N folder with manifest.json)")
    try:
        weights = load_weights(found)
    except CheckpointError as error:
        raise ConfigError("checkpoint", checkpoint, f"is not a usable checkpoint: {error}") from None
    tensors = hf_tensors(layers, weights, found)
    config = copy.deepcopy(model.config)
    if any(getattr(layer, "hf_fallback", None) for layer in layers):
        config.tie_word_embeddings = False  # the head trained its own copy
    config.dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _write(folder, config, tensors)
    return folder


def hf_tensors(layers, weights: dict[str, torch.Tensor], checkpoint: str) -> dict[str, torch.Tensor]:
    """Return the checkpoint's ``weights`` by Hugging Face name, refusing as ``export`` does.

    A layer's non-persistent buffers (rotary frequencies) are in layerpipe's checkpoints, not in Hugging Face
    folders: they are left out.
    """
    tensors, known = {}, set()
    for index, layer in enumerate(layers):
        known.update(f"{index}.{name}" for name, _ in layer.named_buffers())
        for local, tensor in layer.state_dict(keep_vars=True).items():
            key, name = f"{index}.{local}", layer_names(layer, index)[local]
            known.add(key)
            if key not in weights:
                raise ConfigError("checkpoint", checkpoint, f"has no tensor {key} (the model's {name})")
            if tuple(weights[key].shape) != tuple(tensor.shape):
                raise ConfigError(
                    "checkpoint",
                    checkpoint,
                    f"holds {key} of shape {tuple(weights[key].shape)}, the model's {name} is {tuple(tensor.shape)}",
                )
            tensors[name] = weights[key].contiguous()
    for key in weights:
        if key not in known:
            raise ConfigError("checkpoint", checkpoint, f"holds {key}, which no layer of this model has")
    return tensors


def _write(folder: str, config, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``folder``, each through a temporary name."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, SINGLE + ".partial")
    save_file(tensors, partial, metadata={"format": "pt"})
    config.to_json_file(os.path.join(folder, "config.json.partial"))
    os.replace(partial, os.path.join(folder, SINGLE))
    os.replace(os.path.join(folder, "config.json.partial"), os.path.join(folder, "config.json"))
