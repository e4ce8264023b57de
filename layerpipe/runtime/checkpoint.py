"""Complete checkpoints of a ``Pipeline``: weights, optimizer state and training state, written atomically, verified on load.

A checkpoint is a folder:

* ``model-*.safetensors`` and ``model.safetensors.index.json`` — every
  tensor, written by ``torch.distributed.checkpoint`` with its safetensors
  storage (each process writes its own stages; replicas' copies are
  written once): ``model.<name>`` for each parameter and buffer and
  ``optimizer.<name>.<key>`` for each optimizer state, parameters named as in
  ``nn.Sequential(*layers)`` and optimizer state cut into the parameters, so
  the checkpoint loads into another layout;
* ``process-<n>.json`` — process ``n``'s own state: the caller's training
  state (step, data position, ...), its random states, the optimizer's
  hyperparameters and its stages' learning-rate scheduler states (by stage
  index, each scheduler's ``state_dict()`` as JSON);
* ``tied.json`` — where the model ties a parameter across stages: the
  other holders' names of it, each with the name it is stored under once;
* ``manifest.json`` — written last: the format, the step, and the size and
  SHA-256 digest of every other file.

It is written to ``<folder>.partial`` and renamed when complete, so a folder
without ``.partial`` is a whole checkpoint.  Loading checks the manifest and
every digest before it reads anything, and refuses, with ``CheckpointError``
in one line naming the file, a missing manifest, a foreign format, a missing,
truncated or altered file.  Nothing is unpickled: tensors are safetensors,
everything else JSON.  The files' side — the manifest, its verification,
finding and pruning step folders — is ``layerpipe.checkpoint_files``
(without torch, for the command line); this module moves the tensors.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from ..checkpoint_files import CheckpointError, seal, verify_checkpoint, write_json
from .schedulers import load_scheduler_states, scheduler_states
from .ties import aliases, check_tied_values

TIED_FILE = "tied.json"
"""The names of parameters tied across stages, each holder's but the first -> the first, stored under it once."""


# ---------------------------------------------------------------- random states
def random_states() -> dict[str, Any]:
    """Return this process's random states (Python, torch CPU and, where present, CUDA) as JSON-ready values."""
    states = {"python": _jsonable(random.getstate()), "torch": _encode(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [_encode(state) for state in torch.cuda.get_rng_state_all()]
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    """Set this process's random states from ``random_states``'s values."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_decode(states["torch"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(state) for state in states["cuda"]])


def generator_state(generator: torch.Generator) -> str:
    """Return a torch generator's state as text (a data position, for instance)."""
    return _encode(generator.get_state())


def restore_generator(generator: torch.Generator, state: str) -> None:
    """Set a torch generator's state from ``generator_state``'s text."""
    generator.set_state(_decode(state))


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    return value


# ---------------------------------------------------------------- fault injection
def kill_if_asked(where: str, step) -> None:
    """Fault injection for tests: kill this process with SIGKILL where ``LAYERPIPE_KILL_AT`` asks.

    ``LAYERPIPE_KILL_AT=PROCESS:STEP`` kills process ``PROCESS`` as step
    ``STEP`` begins; ``PROCESS:checkpoint:STEP`` while it writes the
    checkpoint of step ``STEP`` (its tensors written, the manifest not).
    With ``LAYERPIPE_KILL_ONCE=FILE`` it kills only if ``FILE`` does not
    exist, and creates it first: a restarted run goes through.
    """
    asked = os.environ.get("LAYERPIPE_KILL_AT")
    wanted = f"{dist.get_rank()}:{step}" if where == "step" else f"{dist.get_rank()}:{where}:{step}"
    if asked != wanted:
        return
    once = os.environ.get("LAYERPIPE_KILL_ONCE")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- saving
def save_checkpoint(pipe, folder: str, training: dict[str, Any] | None = None) -> str:
    """Write ``pipe``'s complete state and this process's ``training`` state (JSON-ready) to ``folder``; return it.

    Collective over every process of the pipeline.  The folder appears only
    when complete (written as ``<folder>.partial``, then renamed); an earlier
    folder of the same name is replaced.  ``training`` is optional (none: an
    empty dict); its ``step``, if any, is also the manifest's.
    """
    training = {} if training is None else training
    partial = folder + ".partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    stored_once = aliases(pipe.tied)  # a tied parameter's other holders' names: stored under its first name only
    weights = {name: value for name, value in pipe.gathered_state_dict().items() if name not in stored_once}
    optimizer = pipe.optimizer_state_dict()
    optimizer["state"] = {name: value for name, value in optimizer["state"].items() if name not in stored_once}
    schedulers = scheduler_states(pipe.schedulers)  # after the flush; refused before any tensor is written
    tensors = {f"model.{name}": value for name, value in weights.items()}
    tensors.update(
        {
            f"optimizer.{name}.{key}": value
            for name, values in optimizer["state"].items()
            for key, value in values.items()
        }
    )
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(partial, save_distributed=True))
    kill_if_asked("checkpoint", training.get("step"))
    own = {
        "training": training,
        "random": random_states(),
        "hyperparameters": _plain(optimizer["hyperparameters"]),
        "optimizer_keys": _optimizer_keys(optimizer["state"]),
        "schedulers": schedulers,
    }
    write_json(os.path.join(partial, f"process-{rank}.json"), own)
    if rank == 0 and stored_once:
        write_json(os.path.join(partial, TIED_FILE), stored_once)
    dist.barrier()
    if rank == 0:
        seal(partial, folder, training.get("step"))
    dist.barrier()
    return folder


def _optimizer_keys(state: dict[str, dict]) -> dict[str, str]:
    """Return each optimizer state key with its kind: ``scalar`` or ``parameter`` (shaped like it), and its dtype."""
    keys = {}
    for values in state.values():
        for key, value in values.items():
            keys[key] = f"{'scalar' if value.dim() == 0 else 'parameter'}:{str(value.dtype).removeprefix('torch.')}"
    return keys


def _plain(hyperparameters: dict[str, dict]) -> dict[str, dict]:
    """Return the hyperparameters that JSON holds as they are (numbers, flags, strings, lists of numbers)."""

    def plain(value) -> bool:
        if isinstance(value, (list, tuple)):
            return all(plain(item) for item in value)
        return value is None or isinstance(value, (bool, int, float, str))

    return {
        name: {key: _jsonable(value) for key, value in options.items() if plain(value)}
        for name, options in hyperparameters.items()
    }


# ---------------------------------------------------------------- loading
def load_checkpoint(pipe, folder: str) -> dict[str, Any]:
    """Load a verified checkpoint into ``pipe`` (any layout); return this process's training state.

    Collective over every process of the pipeline.  The training state is
    the one this process saved (empty if it saved none), or process 0's when
    the checkpoint was written by fewer processes, with the saved random
    states under ``"random"``; they are not restored here (see
    ``restore_random_states``).
    """
    manifest = verify_checkpoint(folder)
    rank = dist.get_rank()
    own_path = os.path.join(folder, f"process-{rank}.json")
    own = _read_json(own_path if os.path.exists(own_path) else os.path.join(folder, "process-0.json"))
    templates = _templates(pipe, own["optimizer_keys"], _stored_keys(folder, manifest["files"]))
    dcp.load(templates, storage_reader=HuggingFaceStorageReader(folder))
    weights = {key.removeprefix("model."): value for key, value in templates.items() if key.startswith("model.")}
    try:
        check_tied_values(weights, pipe.tied)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {folder}: {error}") from None
    pipe.load_state_dict(weights)
    state: dict[str, dict] = {}
    for name in weights:
        for key in own["optimizer_keys"]:
            found = templates.get(f"optimizer.{name}.{key}")
            if found is not None:
                state.setdefault(name, {})[key] = found
    pipe.load_optimizer_state_dict({"state": state, "hyperparameters": own["hyperparameters"]})
    if pipe.schedulers:
        load_scheduler_states(pipe.schedulers, _saved_schedulers(folder, manifest["files"]), folder)
    return {**own["training"], "random": own["random"]}


def _saved_schedulers(folder: str, files) -> dict[str, dict]:
    """Return the scheduler states every process saved (``files``: the manifest's), by stage index (a stage's
    replicas saved the same)."""
    states = {}
    for name in sorted(files):
        if name.startswith("process-") and name.endswith(".json"):
            states.update(_read_json(os.path.join(folder, name)).get("schedulers", {}))
    return states


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    """Return a verified checkpoint's parameters and buffers by name (as in ``nn.Sequential(*layers)``), in one process.

    No process group is needed and nothing is unpickled: the safetensors
    files are read after every digest was checked.  Refuses a bad
    checkpoint with ``CheckpointError``.
    """
    from safetensors.torch import load_file

    manifest = verify_checkpoint(folder)
    weights = {}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            for key, value in load_file(os.path.join(folder, name)).items():
                if key.startswith("model."):
                    weights[key.removeprefix("model.")] = value
    tied = _read_tied(folder) if TIED_FILE in manifest["files"] else {}  # stored once: every name again
    return {**{alias: weights[first] for alias, first in tied.items() if first in weights}, **weights}


def _read_tied(folder: str) -> dict[str, str]:
    """Return the checkpoint's names of tied parameters stored once: each holder's name -> the name stored."""
    path = os.path.join(folder, TIED_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path}: not readable as JSON ({error})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CheckpointError(f"checkpoint file {path}: not a map of parameter names")
    return value


def _stored_keys(folder: str, files) -> set[str]:
    """Return the tensor keys a verified checkpoint holds (``files``: its manifest's), read from the safetensors
    headers alone."""
    from safetensors import safe_open

    keys: set[str] = set()
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                keys.update(handle.keys())
    return keys


def _read_json(path: str) -> dict:
    """Return a checkpoint's JSON file; refuse, with ``CheckpointError`` naming it, one that is not JSON of the right shape."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path}: not readable as JSON ({error})") from None
    needed = ("training", "random", "hyperparameters", "optimizer_keys")
    if not isinstance(value, dict) or any(key not in value for key in needed):
        raise CheckpointError(f"checkpoint file {path}: not a layerpipe process state (needs {', '.join(needed)})")
    return value


def _templates(pipe, optimizer_keys: dict[str, str], held_keys: set[str]) -> dict[str, torch.Tensor]:
    """Return empty tensors for every value this process's stages need from a checkpoint, by checkpoint key.

    A tied parameter's other holders read its first name (where it is stored once); where a checkpoint holds
    several of its names (``held_keys``), every process reads them all, so that every one sees copies that
    disagree."""
    templates, renamed = {}, aliases(pipe.tied)
    for index in sorted(pipe.stages):
        stage = pipe.stages[index]
        stored = stage.stored_names()  # a shared parameter's optimizer state is saved under its first name only
        for offset, layer in enumerate(stage.layers):
            prefix = f"{stage.first + offset}."
            for name, tensor in list(layer.named_parameters(remove_duplicate=False)) + list(layer.named_buffers()):
                key = renamed.get(prefix + name, prefix + name)
                for held in {key, prefix + name} if f"model.{prefix}{name}" in held_keys else {key}:
                    templates[f"model.{held}"] = torch.empty(tensor.shape, dtype=tensor.dtype)
            if index not in pipe.optimizers:
                continue
            for name, parameter in layer.named_parameters(remove_duplicate=False):
                if not parameter.requires_grad or stored[prefix + name] != prefix + name:
                    continue
                for key, kind in optimizer_keys.items():
                    shape_kind, dtype = kind.split(":")
                    shape = () if shape_kind == "scalar" else parameter.shape
                    saved = renamed.get(prefix + name, prefix + name)
                    templates[f"optimizer.{saved}.{key}"] = torch.empty(shape, dtype=getattr(torch, dtype))
    for parameter in pipe.tied:  # where several copies are stored every process reads them: all refuse alike
        stored = [name for name in parameter.names.values() if f"model.{name}" in held_keys]
        for name in stored if len(stored) > 1 else ():  # stored once (as layerpipe writes): nothing to compare
            templates[f"model.{name}"] = torch.empty(parameter.shape, dtype=parameter.dtype)
    return templates
