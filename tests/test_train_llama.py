"""`layerpipe train --model llama`: the Shakespeare demo with a Hugging Face causal LM split by ``layerpipe.hf.split``.

A small Llama trains, prints a sample that its trained weights give, resumes
from a checkpoint bit for bit, exports to a folder ``--init-from`` starts
from, trains at 2 × 2 with ZeRO-3 on zb-v as it does
on 2 processes; a GPT-2 config file (its head tied) trains in its place; bad input is refused
in one line before any process starts.  (The default run's loss falls by more
than 40 %: measured once, in docs/hf.md, as it takes minutes.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_train import run_train

pytest.importorskip("transformers")

LLAMA = [
    "--model",
    "llama",
    "--llama-width",
    "32",
    "--llama-heads",
    "4",
    "--llama-kv-heads",
    "2",
    "--llama-layers",
    "2",
    "--llama-mlp-width",
    "64",
    "--block-size",
    "32",
    "--batch-size",
    "16",
    "--microbatches",
    "4",
    "--sample-length",
    "20",
    "--learning-rate",
    "0.01",
    "--steps",
    "24",
]


def weights_of(folder):
    from layerpipe.runtime.checkpoint import load_weights

    return load_weights(str(folder))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The small Llama trained 24 steps on 2 processes, a checkpoint every 12: what the other runs are held to."""
    output = tmp_path_factory.mktemp("llama") / "straight"
    done = run_train(*LLAMA, "--checkpoint-every", "12", "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    return output, done.stdout


def sample_of_the_weights(checkpoint: str, arguments: list[str]) -> str:
    """In one process: the demo's layers with the checkpoint's weights, one stage; return the text they generate."""
    import torch

    import layerpipe
    from layerpipe.runtime.pipeline import Pipeline
    from layerpipe.train.config import build_parser, config_from
    from layerpipe.train.tasks import LlamaTask, generate

    config = config_from(build_parser().parse_args(arguments), writes_output=False)
    task = LlamaTask(config)
    layers = layerpipe.materialise(task.layers(), seed=config.seed)  # built on the meta device
    missing, unexpected = torch.nn.Sequential(*layers).load_state_dict(weights_of(checkpoint), strict=False)
    assert not missing and all(".rotary." in name for name in unexpected), (missing, unexpected)  # rotary: recomputed
    return generate(Pipeline(layers, task.loss_fn, config.pipeline), task.text, config)


@pytest.mark.multiprocess
def test_the_llama_learns_prints_the_sample_its_trained_weights_give_and_resumes_bit_for_bit(straight, tmp_path):
    import layerpipe
    import layerpipe.cli

    output, printed = straight
    summary = json.loads((output / "summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < 0.85 * losses[0]
    assert summary["model"]["class"] == "LlamaForCausalLM" and summary["model"]["num_key_value_heads"] == 2
    assert summary["config"]["llama_width"] == 32 and summary["config"]["model"] == "llama"
    for name in ("loss.png", "timeline.png", "timeline.json", "timeline-data.json"):
        assert (output / name).stat().st_size > 0, name
    assert "sample:" in printed and len(summary["sample"]) >= 20 and summary["sample"] in printed
    one_stage = [*LLAMA, "--ranks", "1", "--schedule", "gpipe", "--output", str(tmp_path / "unused")]
    (found,) = layerpipe.launch(sample_of_the_weights, 1, (str(output / "checkpoints" / "step-24"), one_stage))
    assert found == summary["sample"], "the sample is what the trained weights generate"

    resumed = tmp_path / "resumed"
    shutil.copytree(output, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-24")
    done = run_train(*LLAMA, "--checkpoint-every", "12", "--resume", str(resumed))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "summary.json").read_text())["losses"] == losses
    weights, reference = (weights_of(folder / "checkpoints" / "step-24") for folder in (resumed, output))
    assert sorted(weights) == sorted(reference)
    assert all(weights[name].equal(reference[name]) for name in reference)

    exported = tmp_path / "exported"  # the run wrote the model's config.json beside its checkpoints
    layerpipe.cli.main(["export", str(output), "--config", str(output), "--output", str(exported)])
    done = run_train(*LLAMA, "--steps", "2", "--init-from", str(exported), "--output", str(tmp_path / "warm"))
    assert done.returncode == 0, done.stderr[-3000:]
    warm = json.loads((tmp_path / "warm" / "summary.json").read_text())["losses"]
    assert warm[0] < 0.9 * losses[0], "started from the trained weights, not the seed's"


@pytest.mark.multiprocess
def test_the_llama_trains_at_2x2_with_zero3_on_zb_v_as_on_two_processes(straight, tmp_path):
    output = tmp_path / "run"
    layout = ["--schedule", "zb-v", "--data-parallel", "2", "--zero", "3", "--recompute", "full"]
    done = run_train(*LLAMA, *layout, "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 pipeline ranks × 2 data-parallel replicas = 4 processes" in done.stdout and "sample:" in done.stdout
    expected = json.loads((straight[0] / "summary.json").read_text())["losses"]
    found = json.loads((output / "summary.json").read_text())["losses"]
    assert found == pytest.approx(expected, rel=1e-4)


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "tie_word_embeddings": False}
TIED_GPT2 = {**GPT2, "tie_word_embeddings": True}


@pytest.mark.multiprocess
def test_a_gpt2_config_file_trains_in_the_llamas_place_with_the_texts_characters(tmp_path):
    import torch

    from layerpipe.models.text import CharacterText, load_corpus

    config = write_json(tmp_path / "gpt2.json", {**TIED_GPT2, "vocab_size": 50257, "torch_dtype": "bfloat16"})
    small = ["--block-size", "32", "--batch-size", "8", "--microbatches", "2", "--sample-length", "10"]
    options = ["--model", "llama", "--hf-config", config, *small, "--schedule", "1f1b", "--steps", "3"]
    done = run_train(*options, "--output", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    model = summary["model"]
    assert model["class"] == "GPT2LMHeadModel" and model["hf_config"] == config and model["num_hidden_layers"] == 2
    assert model["vocab_size"] == CharacterText.from_text(*load_corpus()).vocab_size
    assert len(summary["losses"]) == 3 and "sample:" in done.stdout
    weights = weights_of(tmp_path / "run" / "checkpoints" / "step-3")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values() if tensor.is_floating_point())
    embedding, head = (weights[name] for name in ("0.tokens.weight", "3.linear.weight"))
    assert embedding.equal(head), "the tied head trained as the embedding's one parameter"


BAD_FILES = {
    "not-json.json": "{model_type: llama",
    "a-list.json": "[1, 2]",
    "no-type.json": json.dumps({"hidden_size": 32}),
    "unknown.json": json.dumps({"model_type": "no-such-model"}),
    "bert.json": json.dumps({"model_type": "bert"}),
    "tied.json": json.dumps({**GPT2, "tie_word_embeddings": True}),
    "kv.json": json.dumps({"model_type": "mistral", "num_attention_heads": 4, "num_key_value_heads": 3}),
    "rope.json": json.dumps({"model_type": "llama", "rope_scaling": {"rope_type": "nope"}}),
    "short.json": json.dumps({**GPT2, "n_positions": 16}),
    "one-layer.json": json.dumps({**GPT2, "n_layer": 1}),
}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--hf-config", "missing.json"], "--hf-config missing.json: no such file"),
        (["--hf-config", "."], "--hf-config .: holds no config.json"),
        (["--hf-config", "not-json.json"], "--hf-config not-json.json: is not JSON (Expecting property name"),
        (["--hf-config", "a-list.json"], "--hf-config a-list.json: is not a JSON object of configuration entries"),
        (["--hf-config", "no-type.json"], "--hf-config no-type.json: names no model_type: give that of a covered"),
        (["--hf-config", "unknown.json"], "--hf-config unknown.json: has model_type 'no-such-model', which trans"),
        (
            ["--hf-config", "bert.json"],
            "--hf-config bert.json: builds BertLMHeadModel, which layerpipe.hf.split does not cover: it covers "
            "GPT2LMHeadModel, LlamaForCausalLM",
        ),
        (["--hf-config", "tied.json", "--schedule", "async"], "--schedule async: async updates each stage on its own"),
        (["--hf-config", "rope.json"], "--hf-config rope.json: transformers cannot build its model (KeyError: 'nope')"),
        (
            ["--hf-config", "kv.json"],
            "--hf-config kv.json: num_key_value_heads (3) must divide num_attention_heads (4)",
        ),
        (
            ["--hf-config", "short.json", "--block-size", "32"],
            "--block-size 32: the model of --hf-config (short.json) has 16 positions",
        ),
        (
            ["--hf-config", "one-layer.json", "--stages-per-rank", "2"],
            "--hf-config one-layer.json: the model has 3 layers (embedding, 1 decoder layers, norm and head) but 4",
        ),
        (
            ["--hf-config", "one-layer.json", "--llama-width", "64"],
            "--llama-width 64: the model's sizes come from --hf-config (one-layer.json): leave it out",
        ),
        (["--llama-heads", "3"], "--llama-heads 3: must divide --llama-width (128)"),
        (["--llama-kv-heads", "3"], "--llama-kv-heads 3: must divide --llama-heads (4)"),
        (["--llama-layers", "0"], "--llama-layers 0: must be a whole number of at least 1"),
        (["--llama-layers", "1", "--stages-per-rank", "2"], "--llama-layers 1: the model has 3 layers"),
        (["--sparsity", "2:4"], "--sparsity 2:4: applies to --model gpt only"),
        (["--init-from", "."], "--init-from .: is no folder written by save_pretrained"),
        (["--width", "64"], "--width 64: sizes --model gpt: the Llama's is --llama-width"),
        (["--dropout", "0.1"], "--dropout 0.1: applies to --model gpt only"),
        (["--spatial", "2"], "--spatial 2: the Llama's layers see whole sequences"),
        (["--recompute", "selective"], "--recompute selective: the Llama's layers mark no region to recompute"),
    ],
)
def test_bad_llama_options_give_one_line_and_status_2(tmp_path, monkeypatch, capsys, arguments, message):
    from layerpipe.train.command import main  # in this process: it refuses before starting any

    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "llama", *arguments, "--output", str(tmp_path / "never")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"layerpipe train: error: {message}"), lines
    assert not os.path.exists(tmp_path / "never")


@pytest.mark.parametrize("model", ["gpt", "superres"])
def test_llama_options_with_another_model_are_refused_in_one_line(tmp_path, capsys, model):
    from layerpipe.train.command import main

    assert main(["--model", model, "--llama-layers", "2", "--output", str(tmp_path / "never")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "layerpipe train: error: --llama-layers 2: applies to --model llama only"
    ]


def test_the_llama_without_transformers_is_refused_in_one_line_naming_the_extra(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "from layerpipe.cli import main\n"
        f"sys.exit(main(['train', '--model', 'llama', '--output', {str(tmp_path / 'never')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "layerpipe train: error: --model llama: needs the transformers package: install the extra with "
        "pip install 'layerpipe[hf]'"
    ]
