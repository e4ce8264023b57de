"""Meta-device builds, Hugging Face folders loaded stage by stage, and checkpoints exported back to ``transformers``.

One launch of 2 gloo processes checks: layers built on the meta device get
the weights ``layerpipe.materialise`` gives in one process, in two layouts
(2 ranks × 1 stage and 2 ranks × 2 stages), for plain torch layers and a
Hugging Face Llama, whose float64 evaluation loss on a fixed batch is the
reference's in both, untied and tied (the tied head starts as the embedding
on every rank, as in one process); a tiny random Llama saved sharded and a tied GPT-2
saved whole load into a 2-process pipeline built on the meta device and give
the model's own loss; a checkpoint of that pipeline after two AdamW steps,
exported, loads in ``transformers`` with the pipeline's logits.  Bad input
is refused in one line naming the layer or the tensor.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from runtime_models import relative_error
from test_hf import LLAMA_SIZES, run_layers, tiny_model
from torch import nn

import layerpipe
import layerpipe.cli
from layerpipe.knobs import ConfigError
from layerpipe.runtime.partition import balance_by_parameters

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("layerpipe.hf")
from layerpipe import hf_export, hf_weights  # noqa: E402

TOLERANCE = 1e-12
LAYOUTS = (dict(schedule="1f1b"), dict(schedule="breadth-first", stages_per_rank=2))


def meta_llama(tied: bool = False):
    """Return a float64 tiny Llama (the sizes of ``test_hf``) built on the meta device."""
    config = transformers.LlamaConfig(**LLAMA_SIZES, tie_word_embeddings=tied)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config).double()


def meta_gpt2():
    """Return the meta twin of ``tiny_model("gpt2")``: built from its config on the meta device."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(tiny_model("gpt2").config).double()


def torch_layers(device: str = "meta") -> list[nn.Module]:
    """Return four plain torch layers (each initialised by ``reset_parameters``) built on ``device``."""
    with torch.device(device):
        return [
            nn.Embedding(16, 8),
            nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh()),
            nn.Sequential(nn.Linear(8, 8), nn.GELU()),
            nn.Linear(8, 16),
        ]


def named_tensors(layers) -> dict[str, torch.Tensor]:
    """Return every parameter and buffer of ``layers`` named as a pipeline names them (``"<layer>.<name>"``)."""
    return {
        f"{index}.{name}": tensor
        for index, layer in enumerate(layers)
        for name, tensor in itertools.chain(layer.named_parameters(), layer.named_buffers())
    }


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(input_ids, labels)``: four rows of eight tokens of the vocabulary 64."""
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(seed))
    return ids, ids


def pipeline(layers, layout: dict, **options):
    return layerpipe.Pipeline(layers, hf.causal_lm_loss, microbatches=2, timeout=60, **layout, **options)


def largest_difference(state: dict, expected: dict) -> float:
    """Return the largest relative error of ``state``'s tensors against ``expected``'s (floats only)."""
    return max((relative_error(v, expected[k]) for k, v in state.items() if v.is_floating_point()), default=0.0)


def meta_builds() -> list:
    """Worker: for each layout, how far the meta build is from ``materialise``'s weights and loss, and what it holds."""
    results = []
    ids, labels = batch(1)
    reference_llama = layerpipe.materialise(hf.split(meta_llama()), seed=7)
    with torch.no_grad():
        reference_loss = float(hf.causal_lm_loss(run_layers([layer.eval() for layer in reference_llama], ids), labels))
    reference_torch = named_tensors(layerpipe.materialise(torch_layers(), seed=7))
    tied = tied_reference_loss(ids, labels)
    for layout in LAYOUTS:
        pipe = layerpipe.Pipeline(torch_layers(), nn.functional.mse_loss, microbatches=2, seed=7, **layout)
        state = pipe.gathered_state_dict()
        torch_error = largest_difference(state, reference_torch)
        pipe = pipeline(hf.split(meta_llama()), layout, seed=7)
        state = pipe.gathered_state_dict()
        expected = named_tensors(reference_llama)
        llama_error = largest_difference(state, expected)
        loss = pipe.eval_step(ids, labels)
        assert not any(shard.has_gradients for shard in pipe.shards.values()), "evaluating makes no gradient buffer"
        tied_loss = pipeline(hf.split(meta_llama(tied=True)), layout, seed=7).eval_step(ids, labels)
        errors = [abs(value - expected) / expected for value, expected in ((loss, reference_loss), (tied_loss, tied))]
        results.append((torch_error, llama_error, sorted(state), max(errors)))
    return results


def tied_reference_loss(ids, labels) -> float:
    """Return the evaluation loss of the tied meta Llama materialised in one process, whose head is its embedding."""
    layers = layerpipe.materialise(hf.split(meta_llama(tied=True)), seed=7)
    assert layers[-1].linear.weight is layers[0].tokens.weight, "materialising keeps the tie"
    with torch.no_grad():
        return float(hf.causal_lm_loss(run_layers([layer.eval() for layer in layers], ids), labels))


def loaded_and_exported(llama_folder: str, gpt2_folder: str, checkpoint: str) -> tuple:
    """Worker: the losses of pipelines loaded from the folders, and the logits after two steps and a checkpoint."""
    ids, labels = batch(2)
    try:  # every process refuses before any communication, so the pipelines below start as usual
        pipeline(hf.split(meta_llama()), LAYOUTS[0], init_from=gpt2_folder)
        refusal = None
    except ConfigError as error:
        refusal = str(error)
    gpt2 = pipeline(hf.split(meta_gpt2(), untie=True), LAYOUTS[0], init_from=gpt2_folder)
    gpt2_loss = gpt2.eval_step(ids, labels)
    layers = hf.split(meta_llama())
    pipe = pipeline(layers, LAYOUTS[1], init_from=llama_folder, optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    llama_loss = pipe.eval_step(ids, labels)
    held = [index for index, layer in enumerate(layers) if not is_meta_layer(layer)]
    for step in range(2):
        pipe.train_step(*batch(3 + step))
    layerpipe.save_checkpoint(pipe, checkpoint)
    return llama_loss, gpt2_loss, pipe.forward(ids), held, refusal


def is_meta_layer(layer) -> bool:
    return any(parameter.is_meta for parameter in layer.parameters())


def model_loss(model, seed: int) -> float:
    ids, labels = batch(seed)
    with torch.no_grad():
        return float(hf.causal_lm_loss(model(input_ids=ids).logits, labels))


@pytest.mark.multiprocess
def test_meta_builds_equal_the_one_process_reference_in_two_layouts():
    per_process = layerpipe.launch(meta_builds, 2, timeout=300)
    for layout, rows in zip(LAYOUTS, zip(*per_process)):
        for torch_error, llama_error, _, loss_error in rows:
            assert torch_error == 0.0, f"{layout}: plain torch layers differ by {torch_error:.2e}"
            assert llama_error == 0.0, f"{layout}: Llama layers differ by {llama_error:.2e}"
            assert loss_error <= TOLERANCE, f"{layout}: evaluation loss relative error {loss_error:.2e}"
        held = sorted(name for row in rows for name in row[2])
        assert held == sorted(named_tensors(layerpipe.materialise(hf.split(meta_llama()), seed=7))), layout


@pytest.mark.multiprocess
def test_a_saved_folder_loads_into_two_processes_and_exports_back(tmp_path):
    llama, gpt2 = tiny_model("llama", seed=3), tiny_model("gpt2", seed=4)
    llama.save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert (tmp_path / "llama" / hf_weights.INDEX).exists() and not (tmp_path / "gpt2" / hf_weights.INDEX).exists()
    checkpoint = str(tmp_path / "checkpoint")
    per_process = layerpipe.launch(
        loaded_and_exported, 2, (str(tmp_path / "llama"), str(tmp_path / "gpt2"), checkpoint), timeout=300
    )
    for llama_loss, gpt2_loss, _, held, refusal in per_process:
        assert refusal is not None and "\n" not in refusal and "has no tensor model.embed_tokens.weight" in refusal
        assert abs(llama_loss - model_loss(llama, 2)) <= TOLERANCE * llama_loss
        assert abs(gpt2_loss - model_loss(gpt2, 2)) <= TOLERANCE * gpt2_loss
        assert 0 < len(held) < 6, f"a process materialised layers {held}, not only its own"
    logits = next(row[2] for row in per_process if row[2] is not None)
    layerpipe.cli.main(["export", checkpoint, "--config", str(tmp_path / "llama"), "--output", str(tmp_path / "out")])
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(exported(input_ids=batch(2)[0]).logits, logits) <= TOLERANCE
    assert relative_error(exported.lm_head.weight, llama.lm_head.weight) > 1e-4, "the trained weights, not the saved"


def test_a_meta_layer_without_an_initialisation_rule_is_refused_in_one_line():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))

    with torch.device("meta"):
        layers = [nn.Linear(8, 8), Scale()]
    with pytest.raises(ConfigError) as refused:
        layerpipe.materialise(layers)
    assert "\n" not in str(refused.value) and "[1] Scale" in str(refused.value) and "'scale'" in str(refused.value)
    assert layers[0].weight.is_meta, "nothing materialised before the refusal"


def test_partitioning_by_parameters_sizes_meta_layers_without_memory():
    assert balance_by_parameters(torch_layers("meta"), 2) == balance_by_parameters(torch_layers("cpu"), 2)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_a_folder_whose_tensors_do_not_fit_is_refused_naming_the_tensor(tmp_path, change):
    from safetensors.torch import load_file, save_file

    tiny_model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / hf_weights.SINGLE)
    name = "model.layers.1.mlp.up_proj.weight"
    if change == "missing":
        del tensors[name]
    elif change == "extra":
        tensors[name := "model.layers.9.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].clone()
    else:
        tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, tmp_path / hf_weights.SINGLE)
    with pytest.raises(ConfigError) as refused:
        hf_weights.check_folder(hf.split(meta_llama()), str(tmp_path))
    assert "\n" not in str(refused.value) and name in str(refused.value), str(refused.value)


def test_a_checkpoint_of_another_model_is_refused_by_export_naming_the_tensor(tmp_path):
    weights = {
        f"{index}.{name}": value
        for index, layer in enumerate(hf.split(tiny_model("llama")))
        for name, value in layer.state_dict().items()
    }
    del weights["2.layer.mlp.up_proj.weight"]
    with pytest.raises(ConfigError) as refused:
        hf_export.hf_tensors(hf.split(meta_llama()), weights, "ckpt")
    assert "\n" not in str(refused.value) and "2.layer.mlp.up_proj.weight" in str(refused.value)


def test_training_the_gpt_demo_from_a_hugging_face_folder_is_refused_in_one_line(tmp_path):
    from layerpipe.models.config import GPTConfig
    from layerpipe.train.folders import check_init_from

    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as refused:
        check_init_from(str(tmp_path), GPTConfig())
    assert "\n" not in str(refused.value) and "Hugging Face save_pretrained folder" in str(refused.value)


def test_export_refuses_in_one_line_a_missing_checkpoint_and_an_uncovered_model(tmp_path, capsys):
    tiny_model("llama").config.save_pretrained(tmp_path / "llama")
    transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path / "bert"
    )
    for config, said in (("llama", "--checkpoint nowhere: holds no complete checkpoint"), ("bert", "not covered")):
        status = layerpipe.cli.main(
            ["export", "nowhere", "--config", str(tmp_path / config), "--output", str(tmp_path / "out")]
        )
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and said in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_materialising_recomputes_the_buffers_hugging_face_does_not_save():
    layers = layerpipe.materialise(hf.split(meta_llama()), seed=1)
    real = tiny_model("llama").model.rotary_emb
    assert torch.equal(layers[1].rotary.inv_freq, real.inv_freq) and not layers[1].rotary.inv_freq.is_meta


def test_a_folder_for_layers_split_did_not_make_is_refused_in_one_line(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as refused:
        hf_weights.check_folder(torch_layers(), str(tmp_path))
    assert (
        "\n" not in str(refused.value)
        and "layer 0 (Embedding)" in str(refused.value)
        and "hf.split" in str(refused.value)
    )


def test_each_layer_and_each_seed_draws_its_own_weights():
    first, again, other = (layerpipe.materialise(hf.split(meta_llama()), seed=seed) for seed in (1, 1, 2))
    weight = lambda layers, index: layers[index].layer.self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(weight(first, 1), weight(again, 1)), "the same seed gives the same weights"
    assert not torch.equal(weight(first, 1), weight(first, 2)), "two decoder layers of one model differ"
    assert not torch.equal(weight(first, 1), weight(other, 1)), "another seed gives other weights"
