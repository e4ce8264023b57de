"""Checks of the folders a training run reads and writes: its output, a run to resume, weights to start from."""

from __future__ import annotations

import dataclasses
import os
import tempfile

from ..knobs import ConfigError
from ..models.config import GPTConfig


def run_folder_of(resume: str) -> str:
    """Return the output folder of the run ``resume`` names: itself, or a step folder's ``../..``."""
    parent = os.path.dirname(os.path.abspath(resume))
    if os.path.basename(parent) == "checkpoints" and os.path.basename(os.path.abspath(resume)).startswith("step-"):
        return os.path.dirname(parent)
    return resume


def check_resume(resume: str) -> None:
    """Refuse, with ``ConfigError`` on ``resume``, a folder that holds no complete checkpoint to resume from."""
    from ..checkpoint_files import find_checkpoint

    if find_checkpoint(resume) is None:
        raise ConfigError(
            "resume",
            resume,
            "holds no complete checkpoint (give a run's output folder, whose "
            "checkpoints/step-N have a manifest.json, or one such step folder)",
        )


def check_init_from(init_from: str, gpt: GPTConfig) -> None:
    """Refuse, with ``ConfigError`` on ``init_from``, a folder without a complete checkpoint or whose weights do not
    fit the configured model (each dense weight must be there, shaped as this model's)."""
    from ..checkpoint_files import CheckpointError, find_checkpoint
    from ..hf_weights import is_hf_folder
    from ..models.gpt import dense_shapes
    from ..runtime.checkpoint import load_weights

    found = find_checkpoint(init_from)
    if found is None and is_hf_folder(init_from):
        raise ConfigError(
            "init_from",
            init_from,
            "is a Hugging Face save_pretrained folder, whose weights fit a Hugging Face model, not the GPT demo "
            "(in Python: Pipeline(layerpipe.hf.split(model), ..., init_from=folder))",
        )
    if found is None:
        raise ConfigError(
            "init_from",
            init_from,
            "holds no complete checkpoint (give a run's output folder, "
            "whose checkpoints/step-N have a manifest.json, or one such step folder)",
        )
    try:
        weights = load_weights(found)
    except CheckpointError as error:
        raise ConfigError("init_from", init_from, f"is not a usable checkpoint: {error}") from None
    from ..models.text import CharacterText, load_corpus

    model = dataclasses.replace(gpt, vocab_size=CharacterText.from_text(*load_corpus()).vocab_size)
    for name, shape in dense_shapes(model).items():
        if name not in weights:
            raise ConfigError(
                "init_from",
                init_from,
                f"has no weight {name}: it comes from another model or a "
                f"sparse run (start from a dense run of the same `width`, `heads` and `blocks`)",
            )
        if tuple(weights[name].shape) != shape:
            raise ConfigError(
                "init_from",
                init_from,
                f"holds {name} of shape {tuple(weights[name].shape)}, "
                f"this model's is {shape}: give the model options of that run",
            )


OUTPUT_FILES = ("summary.json", "loss.png", "timeline.png", "timeline.json", "timeline-data.json", "superres.png")
"""The files ``layerpipe train`` writes into ``--output`` (beside ``checkpoint/``)."""


def check_output(output: str) -> None:
    """Refuse, with ``ConfigError``, an output folder the run could not write into, before any process starts.

    Creates the folder (the run would) and writes and removes one file in
    it; refuses an existing file in its place, a folder that cannot be
    made or written, and a folder where an output file's name is taken by
    a folder.
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError("output", output, "is a file; name a folder (it is created if missing)")
    try:
        os.makedirs(output, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as error:
        raise ConfigError("output", output, f"cannot be written ({error.strerror or error})") from None
    for name in OUTPUT_FILES:
        if os.path.isdir(os.path.join(output, name)):
            raise ConfigError("output", output, f"holds a folder named {name}, a file the run writes")
