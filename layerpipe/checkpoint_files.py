"""The files of a layerpipe checkpoint: the manifest that seals it, its verification, and finding and pruning step folders.

No torch here: the command line checks ``--resume`` with it before any
process starts.  ``runtime/checkpoint.py`` writes and reads the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

FORMAT = "layerpipe-checkpoint/1"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file and why, in one line."""


def write_json(path: str, value) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def seal(partial: str, folder: str, step) -> None:
    """Write the manifest of the complete ``partial`` folder, then rename it to ``folder``."""
    files = {}
    for name in sorted(os.listdir(partial)):
        path = os.path.join(partial, name)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _digest(path)}
    write_json(os.path.join(partial, MANIFEST), {"format": FORMAT, "step": step, "files": files})
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(partial, folder)


def _digest(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def verify_checkpoint(folder: str) -> dict:
    """Return the checkpoint's manifest after checking every file's size and digest.

    Refuses, with ``CheckpointError`` naming the folder or file: no folder,
    no manifest (a write that never finished, or not a checkpoint), another
    format, a file missing, of the wrong size or with the wrong digest.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint {folder}: no such folder")
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint {folder}: no {MANIFEST}, so it is incomplete (its write did not "
            f"finish) or not a layerpipe checkpoint"
        )
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"expected {FORMAT!r}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(_is_entry(name, entry) for name, entry in files.items()):
        raise CheckpointError(
            f"checkpoint {path}: its file list is not a table of file names to their bytes and "
            f"sha256 (damaged or not written by layerpipe)"
        )
    for name, expected in files.items():
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise CheckpointError(f"checkpoint file {file}: missing")
        if os.path.getsize(file) != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {file}: {os.path.getsize(file)} bytes, the manifest says "
                f"{expected['bytes']} (truncated or altered)"
            )
        if _digest(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {file}: its SHA-256 differs from the manifest's (altered)")
    return manifest


def _is_entry(name: object, entry: object) -> bool:
    """Return whether a manifest entry names a plain file of this folder with a whole size and a hex digest."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        return False
    if not isinstance(entry, dict) or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int):
        return False
    digest = entry.get("sha256")
    return isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def latest_checkpoint(folder: str) -> str | None:
    """Return the complete ``step-N`` folder with the largest ``N`` under ``folder`` (``None`` if there is none)."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        if name.startswith("step-") and name[5:].isdigit() and os.path.exists(os.path.join(folder, name, MANIFEST)):
            steps.append(int(name[5:]))
    return os.path.join(folder, f"step-{max(steps)}") if steps else None


def prune_checkpoints(folder: str, keep: int) -> None:
    """Remove all but the ``keep`` latest complete ``step-N`` folders under ``folder``, and any unfinished ``.partial`` one."""
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    complete = sorted(
        (int(name[5:]) for name in names if name.startswith("step-") and name[5:].isdigit()), reverse=True
    )
    for step in complete[keep:]:
        shutil.rmtree(os.path.join(folder, f"step-{step}"), ignore_errors=True)
    for name in names:
        if name.endswith(".partial"):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def find_checkpoint(path: str) -> str | None:
    """Return the checkpoint ``path`` names: itself when it is a complete step folder, else its latest (``None``: none)."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        return path
    return latest_checkpoint(checkpoints_of(path))


def checkpoints_of(output: str) -> str:
    """Return the folder that holds a run's ``step-N`` checkpoints, given the run's output folder."""
    return os.path.join(output, "checkpoints")
