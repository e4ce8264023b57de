"""``layerpipe.hf.split``: Hugging Face causal LMs trained through a pipeline equal the unsplit model in float64.

Tiny models built from configs (nothing downloaded): the split layers give
the model's logits exactly for every covered family; on 2 and 4 gloo
processes, three AdamW steps through several schedules (and at 2×2 with
ZeRO-3) give the unsplit model's losses and parameters, relative error at
most 1e-10, and the loss its own ``labels=`` call gives (which upcasts the
logits to float32, so to 1e-6).  Bad input is refused in one line.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_models import relative_error
from torch import nn

import layerpipe

transformers = pytest.importorskip("transformers")  # CI installs the extra hf; this guards a bare install
hf = pytest.importorskip("layerpipe.hf")

STEPS = 3
TOLERANCE = 1e-10
HF_LOSS_TOLERANCE = 1e-6  # the models' own loss upcasts float64 logits to float32
VOCABULARY, TIME, ROWS = 64, 8, 8
LLAMA_SIZES = dict(
    vocab_size=VOCABULARY,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    use_cache=False,
)


def tiny_model(family: str, seed: int = 0):
    """Return a float64 four-layer model of ``family`` with hidden width 32 and vocabulary 64, without dropout."""
    torch.manual_seed(seed)
    configs = {
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=VOCABULARY,
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "llama": lambda: transformers.LlamaConfig(**LLAMA_SIZES),
        "llama-tied": lambda: transformers.LlamaConfig(**LLAMA_SIZES, tie_word_embeddings=True),
        "mistral": lambda: transformers.MistralConfig(**LLAMA_SIZES, sliding_window=3),
        "qwen2": lambda: transformers.Qwen2Config(
            **LLAMA_SIZES, use_sliding_window=True, sliding_window=3, max_window_layers=2
        ),
        "qwen3": lambda: transformers.Qwen3Config(**LLAMA_SIZES, head_dim=8),
    }
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).double()


def padded_batch(seed: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return ``(input_ids, attention_mask or None, labels)`` of ``ROWS`` rows; labels are -100 on padding.

    Left padding of 0, 3, 3, 1, 2, 2, 1, 3 tokens: every pair of rows holds
    12 labelled tokens after the shift (a row padded by 0 or 1 has 7, by 2 has
    6, by 3 has 5), so a pipeline's mean of micro-batch means equals the
    model's mean over the batch for micro-batches of 2 or 4 rows.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCABULARY, (ROWS, TIME), generator=generator)
    if not padded:
        return ids, None, ids.clone()
    mask = torch.ones(ROWS, TIME, dtype=torch.long)
    for row, padding in enumerate((0, 3, 3, 1, 2, 2, 1, 3)):
        mask[row, :padding] = 0
    return ids, mask, ids.masked_fill(mask == 0, hf.IGNORE_INDEX)


def run_layers(layers, *inputs):
    """Return the output of ``layers`` run in order, a tuple passed on as separate arguments."""
    value = inputs
    for layer in layers:
        value = layer(*value) if isinstance(value, tuple) else layer(value)
    return value


def untied_copy(model):
    """Return a copy of ``model`` whose head holds its own copy of the embedding matrix (what ``untie=True`` trains)."""
    reference = copy.deepcopy(model)
    if hf.is_tied(reference):
        head = reference.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())
    return reference


def hugging_face_names(model, layers) -> dict[str, str]:
    """Return the model's name of every layer parameter, keyed ``"<layer>.<name>"`` (an untied head is ``lm_head``)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {
        f"{index}.{name}": names.get(id(parameter), "lm_head.weight")
        for index, layer in enumerate(layers)
        for name, parameter in layer.named_parameters()
    }


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("padded", [False, True])
def test_the_split_layers_give_the_models_logits(family, padded):
    model = tiny_model(family)
    ids, mask, _ = padded_batch(1, padded)
    layers = hf.split(model, untie=True)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        found = run_layers(layers, ids) if mask is None else run_layers(layers, ids, mask)
    assert len(layers) == 6
    assert torch.equal(found, expected)


def test_the_loss_is_the_models_own_loss():
    model = tiny_model("llama")
    ids, mask, labels = padded_batch(2, padded=True)
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, labels=labels)
        found = hf.causal_lm_loss(output.logits, labels)
    assert abs(float(found) - float(output.loss)) <= HF_LOSS_TOLERANCE * float(output.loss)


def test_every_pair_of_padded_rows_holds_as_many_labelled_tokens():
    """What makes a mean of micro-batch means the batch mean (the pipeline's loss the model's)."""
    _, _, labels = padded_batch(1, padded=True)
    labelled = (labels[:, 1:] != hf.IGNORE_INDEX).sum(1)
    assert labelled.view(-1, 2).sum(1).tolist() == [12, 12, 12, 12]


def test_an_architecture_not_covered_is_refused_in_one_line():
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM is not covered") as refused:
        hf.split(transformers.AutoModelForCausalLM.from_config(config))
    assert "\n" not in str(refused.value) and "LlamaForCausalLM" in str(refused.value)


@pytest.mark.parametrize("family", ["gpt2", "llama-tied"])
def test_a_tied_head_stays_tied_unless_untied(family):
    model = tiny_model(family)
    embedding = model.get_input_embeddings().weight
    assert hf.split(model)[-1].linear.weight is embedding
    head = hf.split(model, untie=True)[-1].linear
    assert head.weight is not embedding and torch.equal(head.weight, embedding)
    assert hf.is_tied(model), "the caller's model keeps its tie"


def test_an_attention_mask_of_another_shape_is_refused_in_one_line():
    embedding = hf.split(tiny_model("llama"))[0]
    ids, mask, _ = padded_batch(1, padded=True)
    with pytest.raises(
        ValueError, match=r"attention_mask of shape \(8, 7\) for input_ids of shape \(8, 8\)"
    ) as refused:
        embedding(ids, mask[:, 1:])
    assert "\n" not in str(refused.value)


def train_with_a_short_mask() -> float:
    """Worker: one step whose attention mask lacks the inputs' first token."""
    pipe = layerpipe.Pipeline(hf.split(tiny_model("llama")), hf.causal_lm_loss, schedule="1f1b", microbatches=2)
    ids, mask, labels = padded_batch(1, padded=True)
    return pipe.train_step((ids, mask[:, 1:]), labels)


@pytest.mark.multiprocess
def test_a_pipeline_refuses_a_short_mask_before_it_trains():
    with pytest.raises(layerpipe.LaunchError) as refused:
        layerpipe.launch(train_with_a_short_mask, 2, timeout=120)
    said = "stage 0 failed on micro-batch 0 while agreeing tensor shapes: attention_mask of shape (4, 7) for input_ids"
    assert any(said in line for line in str(refused.value).splitlines()), str(refused.value)


def test_importing_layerpipe_imports_no_transformers():
    code = "import sys, layerpipe; layerpipe.Pipeline; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def reference_run(model, padded: bool, untie: bool = True) -> tuple[list, list, dict]:
    """Train a copy of ``model`` (untied with ``untie``) unsplit for ``STEPS`` AdamW steps on
    ``padded_batch(step + 1, padded)``.

    Return per step the float64 loss and the model's own ``labels=`` loss, and the parameters after the steps.
    """
    reference = untied_copy(model) if untie else copy.deepcopy(model)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01)
    losses, own_losses = [], []
    for step in range(STEPS):
        ids, mask, labels = padded_batch(step + 1, padded)
        optimizer.zero_grad()
        output = reference(input_ids=ids, attention_mask=mask, labels=labels)
        loss = hf.causal_lm_loss(output.logits, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        own_losses.append(float(output.loss.detach()))
    return losses, own_losses, {name: p.detach().clone() for name, p in reference.named_parameters()}


def run_cases(cases: list[tuple]) -> list[tuple]:
    """Worker: train every case through a pipeline; return per case the largest errors and the names held."""
    results = []
    for family, padded, schedule, options in cases:
        options = dict(options)
        untie = options.pop("untie", True)
        model = tiny_model(family)
        losses, own_losses, expected = reference_run(model, padded, untie)
        layers = hf.split(model, untie=untie)
        names = hugging_face_names(model, layers)
        pipe = layerpipe.Pipeline(
            layers,
            hf.causal_lm_loss,
            schedule=schedule,
            optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
            timeout=60,
            **options,
        )
        loss_error = own_loss_error = 0.0
        for step in range(STEPS):
            ids, mask, labels = padded_batch(step + 1, padded)
            loss = pipe.train_step(ids if mask is None else (ids, mask), labels)
            loss_error = max(loss_error, abs(loss - losses[step]) / losses[step])
            own_loss_error = max(own_loss_error, abs(loss - own_losses[step]) / own_losses[step])
        state = pipe.gathered_state_dict()
        held = sorted(names[name] for name in state if name in names)
        parameter_error = max(relative_error(state[name], expected[names[name]]) for name in state if name in names)
        results.append((loss_error, own_loss_error, parameter_error, held, sorted(expected)))
        pipe.close()  # its gloo groups' threads would outlive it
    return results


def check(processes: int, cases: list[tuple]) -> None:
    per_process = layerpipe.launch(run_cases, processes, (cases,), timeout=300)
    for index, case in enumerate(cases):
        rows = [results[index] for results in per_process]
        replicas = case[3].get("data_parallel", 1)
        held = sorted(name for row in rows for name in row[3])
        if case[3].get("untie", True):
            assert held == sorted(rows[0][4] * replicas), f"{case}: every parameter on one rank of each replica"
        else:  # the tied embedding is held by the first and the last stage
            assert set(held) == set(rows[0][4]) and len(held) == (len(rows[0][4]) + 1) * replicas, f"{case}: {held}"
        for process, (loss_error, own_loss_error, parameter_error, _, _) in enumerate(rows):
            assert loss_error <= TOLERANCE, f"{case} process {process}: loss relative error {loss_error:.2e}"
            assert own_loss_error <= HF_LOSS_TOLERANCE, f"{case} process {process}: vs labels= {own_loss_error:.2e}"
            assert parameter_error <= TOLERANCE, f"{case} process {process}: parameters {parameter_error:.2e}"


@pytest.mark.multiprocess
def test_two_processes_train_as_the_unsplit_model():
    cases = [
        ("gpt2", False, "breadth-first", dict(microbatches=2, stages_per_rank=2)),
        ("gpt2", True, "1f1b", dict(microbatches=4)),
        ("llama", False, "interleaved", dict(microbatches=4, stages_per_rank=2)),
        ("llama", True, "breadth-first", dict(microbatches=2, stages_per_rank=2)),
        ("llama", True, "zero-bubble", dict(microbatches=4)),
        ("qwen2", True, "gpipe", dict(microbatches=2)),
        ("llama-tied", True, "1f1b", dict(microbatches=2)),
        ("gpt2", True, "1f1b", dict(microbatches=2, untie=False)),
        ("llama-tied", True, "breadth-first", dict(microbatches=2, stages_per_rank=2, untie=False)),
    ]
    check(2, cases)


@pytest.mark.multiprocess
def test_four_processes_and_two_by_two_with_zero3_train_as_the_unsplit_model():
    cases = [
        ("llama", True, "1f1b", dict(microbatches=4)),
        ("gpt2", False, "breadth-first", dict(microbatches=2, stages_per_rank=2, data_parallel=2, zero=3)),
        ("llama", True, "interleaved", dict(microbatches=2, stages_per_rank=2, data_parallel=2, zero=3)),
        ("llama-tied", True, "1f1b", dict(microbatches=4, untie=False)),
        ("gpt2", True, "breadth-first", dict(microbatches=2, stages_per_rank=2, data_parallel=2, zero=3, untie=False)),
    ]
    check(4, cases)


@pytest.mark.multiprocess
def test_the_example_of_the_docs_page_trains(tmp_path):
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "hf.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    (tmp_path / "example.py").write_text(example, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    losses = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    assert len(losses) == 3 and losses[0] > losses[-1]


def padded_lists(seed: int) -> tuple[list, list]:
    """Return two micro-batches of ``(input_ids, attention_mask)`` of lengths 5 and 8, left-padded, and labels."""
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = [], []
    for rows, time, padding in ((2, 5, (0, 2)), (1, 8, (3,))):
        ids = torch.randint(0, VOCABULARY, (rows, time), generator=generator)
        mask = torch.ones(rows, time, dtype=torch.long)
        for row, pad in enumerate(padding):
            mask[row, :pad] = 0
        inputs.append((ids, mask))
        labels.append(ids.masked_fill(mask == 0, hf.IGNORE_INDEX))
    return inputs, labels


def train_on_lists() -> tuple[list, dict]:
    """Worker: train the tiny Llama, split, ``STEPS`` AdamW steps on ``padded_lists``; return losses and state."""
    layers = hf.split(tiny_model("llama"), untie=True)
    pipe = layerpipe.Pipeline(
        layers, hf.causal_lm_loss, "interleaved", microbatches=2, stages_per_rank=2, timeout=60,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
    )  # fmt: skip
    losses = [pipe.train_step(*padded_lists(step)) for step in range(STEPS)]
    return losses, pipe.gathered_state_dict()


@pytest.mark.multiprocess
def test_tuple_microbatches_of_different_lengths_train_as_the_unsplit_model_over_their_tokens():
    model = untied_copy(tiny_model("llama"))
    names = hugging_face_names(model, hf.split(model, untie=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    losses = []
    for step in range(STEPS):
        inputs, labels = padded_lists(step)
        optimizer.zero_grad()
        logits = [model(input_ids=ids, attention_mask=mask).logits[:, :-1] for ids, mask in inputs]
        flat = torch.cat([lo.reshape(-1, VOCABULARY) for lo in logits])
        loss = nn.functional.cross_entropy(flat, torch.cat([la[:, 1:].reshape(-1) for la in labels]))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    expected = dict(model.named_parameters())
    for found_losses, state in layerpipe.launch(train_on_lists, 2, timeout=300):
        assert max(abs(f - e) / e for f, e in zip(found_losses, losses)) <= TOLERANCE
        compared = [name for name in state if name in names]  # parameters, not buffers
        assert len(compared) > 3
        for name in compared:
            assert relative_error(state[name], expected[names[name]].detach()) <= TOLERANCE, name
