"""Complete checkpoints: a resumed pipeline equals the straight run; another layout loads them; bad files are refused.

Weights and optimizer state are saved per parameter, named as in
``nn.Sequential(*layers)``, so a checkpoint of 2 pipeline ranks × 2 replicas
at ZeRO-3 loads into 2 ranks × 1 replica with two stages per rank.  Every
file is sealed by a manifest of digests, checked before anything is read.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from runtime_models import batch, mlp_layers
from torch import nn

import layerpipe
from layerpipe.checkpoint_files import CheckpointError, verify_checkpoint
from layerpipe.runtime.checkpoint import load_checkpoint, load_weights, save_checkpoint

STEPS_BEFORE, STEPS_AFTER = 3, 2


def adamw(parameters):
    return torch.optim.AdamW(parameters, lr=0.05)


def pipeline(options: dict) -> layerpipe.Pipeline:
    return layerpipe.Pipeline(
        mlp_layers(),
        nn.functional.mse_loss,
        **{"schedule": "breadth-first", "microbatches": 4, "optimizer": adamw, "timeout": 60, **options},
    )


def train_save_continue(folder: str, options: dict) -> tuple[list[float], dict]:
    """Worker: train, save, train on; return the losses after the save and the final weights."""
    pipe = pipeline(options)
    for step in range(STEPS_BEFORE):
        pipe.train_step(*batch(8, seed=step + 1))
    save_checkpoint(pipe, folder, {"step": STEPS_BEFORE})
    losses = [pipe.train_step(*batch(8, seed=100 + step)) for step in range(STEPS_AFTER)]
    return losses, pipe.gathered_state_dict()


def load_continue(folder: str, options: dict) -> tuple[list[float], dict, int]:
    """Worker: load the checkpoint into a fresh pipeline and train on; return losses, weights and the saved step."""
    pipe = pipeline(options)
    training = load_checkpoint(pipe, folder)
    losses = [pipe.train_step(*batch(8, seed=100 + step)) for step in range(STEPS_AFTER)]
    return losses, pipe.gathered_state_dict(), training["step"]


def merged(per_process: list) -> tuple[list[float], dict]:
    weights = {name: value for result in per_process for name, value in result[1].items()}
    return per_process[0][0], weights


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of 2 ranks × 2 replicas at ZeRO-3, and what training on from it gave."""
    folder = str(tmp_path_factory.mktemp("checkpoint") / "step-3")
    options = dict(stages_per_rank=1, data_parallel=2, zero=3)
    losses, weights = merged(layerpipe.launch(train_save_continue, 4, (folder, options), timeout=120))
    return folder, options, losses, weights


@pytest.mark.multiprocess
def test_the_same_layout_resumes_bit_for_bit(saved):
    folder, options, losses, weights = saved
    per_process = layerpipe.launch(load_continue, 4, (folder, options), timeout=120)
    found_losses, found = merged(per_process)
    assert all(result[2] == STEPS_BEFORE for result in per_process)
    assert found_losses == losses
    assert sorted(found) == sorted(weights) and all(torch.equal(found[n], weights[n]) for n in weights)


@pytest.mark.multiprocess
def test_another_layout_loads_the_checkpoint_and_trains_on_within_rounding(saved):
    """2 × 2 at ZeRO-3 into 2 × 1 with two stages per rank: the replicas' sum rounds differently, nothing else."""
    folder, _, losses, weights = saved
    found_losses, found = merged(layerpipe.launch(load_continue, 2, (folder, dict(stages_per_rank=2)), timeout=120))
    assert found_losses == pytest.approx(losses, rel=1e-12)
    assert sorted(found) == sorted(weights)
    assert all(torch.allclose(found[n], weights[n], rtol=1e-10, atol=1e-12) for n in weights)


def test_the_weights_load_in_one_process_without_a_process_group(saved):
    folder, *_ = saved
    weights = load_weights(folder)
    model = nn.Sequential(*mlp_layers())
    model.load_state_dict(weights)  # every name and shape fits the layers


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "bytes, the manifest says"),
        ("alter", "its SHA-256 differs from the manifest's (altered)"),
        ("no-manifest", "no manifest.json, so it is incomplete"),
        ("foreign", "format 'someone-else/9', expected 'layerpipe-checkpoint/1'"),
        ("missing-file", ": missing"),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_file(saved, tmp_path, damage, message):
    folder = str(tmp_path / "step-3")
    shutil.copytree(saved[0], folder)
    tensors = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    target = os.path.join(folder, tensors[0])
    if damage == "truncate":
        with open(target, "r+b") as handle:
            handle.truncate(os.path.getsize(target) // 2)
    elif damage == "alter":
        with open(target, "r+b") as handle:
            handle.seek(os.path.getsize(target) - 3)
            handle.write(b"\x00\x01\x02")
    elif damage == "no-manifest":
        os.remove(os.path.join(folder, "manifest.json"))
    elif damage == "foreign":
        manifest = json.load(open(os.path.join(folder, "manifest.json")))
        json.dump({**manifest, "format": "someone-else/9"}, open(os.path.join(folder, "manifest.json"), "w"))
    else:
        os.remove(target)
    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(folder)
    text = str(caught.value)
    assert message in text and "\n" not in text
    if damage in ("truncate", "alter", "missing-file"):
        assert target in text
    with pytest.raises(CheckpointError):
        load_weights(folder)


class Trap:
    """Unpickling this creates a file: the sign that something unpickled what a checkpoint holds."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def load_into_one_process(folder: str) -> str:
    pipe = layerpipe.Pipeline(
        mlp_layers(), nn.functional.mse_loss, schedule="gpipe", microbatches=4, optimizer=adamw, timeout=60
    )
    try:
        load_checkpoint(pipe, folder)
    except CheckpointError as error:
        return str(error)
    return "loaded"


def test_a_crafted_checkpoint_is_refused_without_unpickling_anything(saved, tmp_path):
    """Its author rewrote the manifest too, so every digest matches: the files themselves must not be unpickled."""
    import hashlib
    import pickle

    folder = tmp_path / "step-3"
    shutil.copytree(saved[0], folder)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Trap(str(marker)))
    (folder / "process-0.json").write_bytes(payload)
    (folder / ".metadata").write_bytes(payload)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("process-0.json", ".metadata"):
        manifest["files"][name] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    message = layerpipe.launch(load_into_one_process, 1, (str(folder),))[0]
    assert message.startswith(f"checkpoint file {folder / 'process-0.json'}: not readable as JSON"), message
    load_weights(str(folder))  # the tensors themselves are fine, and read without the pickles
    assert not marker.exists(), "nothing was unpickled"


def save_and_load_with_the_short_spelling(folder: str) -> tuple[dict, dict, dict, list[str]]:
    """Worker: train a step, save with ``layerpipe.save_checkpoint`` (no training dict), load into a fresh pipeline."""
    pipe = pipeline({})
    pipe.train_step(*batch(8))
    layerpipe.save_checkpoint(pipe, folder)
    fresh = pipeline({})
    before = fresh.gathered_state_dict()
    training = layerpipe.load_checkpoint(fresh, folder)
    return pipe.gathered_state_dict(), before, fresh.gathered_state_dict(), sorted(training)


@pytest.mark.multiprocess
def test_the_top_level_package_saves_and_loads_without_a_training_dict(tmp_path):
    folder = str(tmp_path / "saved")
    for saved, before, loaded, keys in layerpipe.launch(
        save_and_load_with_the_short_spelling, 2, (folder,), timeout=120
    ):
        assert keys == ["random"], "no training dict was saved: only the random states come back"
        assert sorted(loaded) == sorted(saved) and all(torch.equal(loaded[n], saved[n]) for n in saved)
        assert not all(torch.equal(before[n], saved[n]) for n in saved), "the step changed the weights"
    assert json.load(open(os.path.join(folder, "manifest.json")))["step"] is None


V_SCHEDULES = ("zb-v", "v-half", "v-min", "dualpipe-v")
"""The schedules on the V-shape placement: rank r holds stages r and 2p-1-r, so a rank's stages are not consecutive."""


def v_schedules_resume(folder: str) -> list[tuple]:
    """Worker: per V schedule, with clipping on, train, save, train on; then a fresh pipeline loads the checkpoint and
    trains on; return both continuations' losses and final weights."""
    results = []
    for name in V_SCHEDULES:
        options = dict(schedule=name, stages_per_rank=2, clip_grad_norm=0.05)
        losses, weights = train_save_continue(os.path.join(folder, name), options)
        found_losses, found, step = load_continue(os.path.join(folder, name), options)
        results.append((name, losses, weights, found_losses, found, step))
    return results


@pytest.mark.multiprocess
def test_every_v_schedule_with_clipping_resumes_bit_for_bit(tmp_path):
    for rows in layerpipe.launch(v_schedules_resume, 2, (str(tmp_path),), timeout=300):
        for name, losses, weights, found_losses, found, step in rows:
            assert step == STEPS_BEFORE and found_losses == losses, name
            assert sorted(found) == sorted(weights) and all(torch.equal(found[n], weights[n]) for n in weights), name
