"""Hugging Face causal language models as a list of layers for ``layerpipe.Pipeline``.

``split(model)`` returns the embedding, one layer per decoder layer and the
final norm with the head.  Each layer reuses the model's own modules (no
copy) and passes ``hidden`` or ``(hidden, attention_mask)`` to the next:

* the attention mask travels as the caller's ``(batch, time)`` mask made
  bool (a byte per token, and no gradient) and every decoder layer builds
  its 4-D mask from it with the model's own mask function;
* rotary position embeddings are computed by every decoder layer from the
  model's own rotary module (positions ``0 .. time-1``, as the unsplit model
  uses when called without ``position_ids``): a few thousand sines per layer
  instead of a float tensor sent, and sent back as a gradient, at every cut.

Covered: ``GPT2LMHeadModel`` and the Llama decoder layout
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``), on transformers 4.54 and later.  ``causal_lm_loss`` is their
training loss (next-token cross-entropy, labels ``-100`` ignored).

transformers is imported only when a function here runs (``import layerpipe`` imports neither).
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn

LLAMA_LAYOUT = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
GPT2_LAYOUT = ("GPT2LMHeadModel",)
COVERED = GPT2_LAYOUT + LLAMA_LAYOUT
IGNORE_INDEX = -100


def split(model, untie: bool = False) -> list:
    """Return ``[embedding, decoder layer × n, norm and head]`` of a covered Hugging Face causal LM.

    Train it with ``Pipeline(split(model), causal_lm_loss, ...)`` and
    ``pipe.train_step((input_ids, attention_mask), labels)`` (or
    ``train_step(input_ids, labels)`` without padding).  The layers hold the
    model's own modules.  A head that shares its weight with the input
    embedding keeps sharing it: the pipeline ties the first and the last stage
    and sums their gradients once per step, so the model trains as one
    process trains it.  ``untie=True`` gives the head its own copy of that
    weight instead (two matrices that train apart: a different model from
    the tied one; the ``model`` object keeps its tie).  Refuses, with
    ``ValueError`` in one line, a class not covered.
    """
    name = type(model).__name__
    if name not in COVERED:
        raise ValueError(
            f"layerpipe.hf.split: {name} is not covered; covered causal LMs are {', '.join(COVERED)} "
            f"(GPT-2 and the Llama decoder layout)"
        )
    head = _head(model, name, untie)
    if name in GPT2_LAYOUT:
        return _labelled(model, [_gpt2_embedding(model), *_gpt2_decoders(model), head])
    return _labelled(model, [Embedding(model.model.embed_tokens), *_llama_decoders(model), head])


def _labelled(model, layers: list) -> list:
    """Return ``layers``, each given the model's weight initialisation and the Hugging Face names of its tensors.

    ``layer.initialise_module`` is the model's ``_init_weights`` (how a meta layer is materialised, see
    ``runtime/materialise.py``); ``layer.hf_names`` maps each name of ``layer.state_dict()`` to the model's
    (what ``save_pretrained`` writes).  The head's own copy of a tied weight is named as the output embedding,
    with ``layer.hf_fallback`` naming the input embedding a tied model's folder holds instead.
    """
    names: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), name)
    output = f"{_module_name(model, model.get_output_embeddings())}.weight"
    input_name = f"{_module_name(model, model.get_input_embeddings())}.weight"
    for layer in layers:
        layer.initialise_module = model._init_weights
        layer.hf_names = {
            local: names.get(id(tensor), output) for local, tensor in layer.state_dict(keep_vars=True).items()
        }
        layer.hf_fallback = {
            local: input_name for local, name in layer.hf_names.items() if name == output and is_tied(model)
        }
    return layers


def _module_name(model, module) -> str:
    """Return the name of ``module`` inside ``model``."""
    return next(name for name, found in model.named_modules() if found is module)


def is_tied(model) -> bool:
    """Return whether the model's head holds the very parameter of its input embedding."""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _head(model, name: str, untie: bool):
    """Return the last layer: the model's head, tied to its input embedding as the model has it unless ``untie``
    (which gives the head a copy of its weight)."""
    linear = model.get_output_embeddings()
    if is_tied(model) and untie:
        linear = copy.deepcopy(linear)
    norm = model.transformer.ln_f if name in GPT2_LAYOUT else model.model.norm
    return Head(norm, linear)


def _gpt2_embedding(model):
    transformer = model.transformer
    return Embedding(transformer.wte, transformer.wpe, transformer.drop)


def _gpt2_decoders(model) -> list:
    config = model.config
    return [Decoder(block, config, "full_attention") for block in model.transformer.h]


def _llama_decoders(model) -> list:
    config, inner = model.config, model.model
    layers = inner.layers[: config.num_hidden_layers]
    return [
        Decoder(layer, config, attention_kind(config, index), inner.rotary_emb) for index, layer in enumerate(layers)
    ]


def attention_kind(config, index: int) -> str:
    """Return ``"full_attention"`` or ``"sliding_attention"`` for decoder layer ``index``, as the model decides it."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return kinds[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def _positions(hidden):
    """Return the position ids ``[[0 .. time-1]]`` the unsplit model uses without ``position_ids``."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def check_mask(input_ids, attention_mask) -> None:
    """Refuse, with ``ValueError`` in one line, an attention mask whose shape is not the input ids'."""
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} for input_ids of shape "
            f"{tuple(input_ids.shape)}: give one mask entry (1 keep, 0 padding) per token"
        )


def _with_mask(hidden, attention_mask):
    """Return what a layer passes on: ``hidden``, or ``(hidden, attention_mask)`` when there is a mask."""
    return hidden if attention_mask is None else (hidden, attention_mask)


def causal_lm_loss(logits, labels):
    """Return the mean next-token cross-entropy of ``logits (batch, time, vocabulary)`` against ``labels (batch, time)``.

    As the covered models' ``loss_function``: the labels are shifted left by
    one inside, and positions labelled ``-100`` are ignored; computed in the
    logits' dtype (the models upcast to float32, which float64 keeps exact).
    """
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    return nn.functional.cross_entropy(flat, shifted.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)


def _counted_labels(labels) -> int:
    """Return how many labels ``causal_lm_loss`` averages over: those after each row's first that are not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


causal_lm_loss.counted_targets = _counted_labels  # weighs lists of micro-batches by counted tokens (microbatch_lists)


class Embedding(nn.Module):
    """Token ids (and a mask) to ``hidden (batch, time, width)``: the token embedding, plus GPT-2's positions."""

    def __init__(self, tokens, positions=None, dropout=None):
        super().__init__()
        self.tokens, self.positions, self.dropout = tokens, positions, dropout

    def forward(self, input_ids, attention_mask=None):
        check_mask(input_ids, attention_mask)
        hidden = self.tokens(input_ids)
        if self.positions is not None:
            hidden = hidden + self.positions(_positions(hidden))
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        # As bool (what the mask functions make of any mask): one byte a token, and never a tensor with a gradient.
        return _with_mask(hidden, None if attention_mask is None else attention_mask.bool())


class Decoder(nn.Module):
    """One decoder layer of the model; builds its attention mask and rotary embedding where it runs."""

    def __init__(self, layer, config, kind: str, rotary=None):
        super().__init__()
        self.layer, self.config, self.kind, self.rotary = layer, config, kind, rotary

    def forward(self, hidden, attention_mask=None):
        positions = _positions(hidden)
        options = {"attention_mask": _attention_mask(self.config, self.kind, hidden, attention_mask, positions)}
        if self.rotary is not None:
            options["position_embeddings"] = self.rotary(hidden, positions)
            options["position_ids"] = positions
        output = self.layer(hidden, **options)
        return _with_mask(output[0] if isinstance(output, tuple) else output, attention_mask)


class Head(nn.Module):
    """``hidden`` to next-token logits: the final norm and the output projection (the mask ends here)."""

    def __init__(self, norm, linear):
        super().__init__()
        self.norm, self.linear = norm, linear

    def forward(self, hidden, attention_mask=None):
        return self.linear(self.norm(hidden))


def _attention_mask(config, kind: str, hidden, attention_mask, positions):
    """Return the attention mask the model's own mask function gives layers of ``kind`` (``None`` where it skips one)."""
    build = _mask_function(kind)
    return build(config, hidden, attention_mask, **_no_cache(build, positions))


@functools.cache
def _mask_function(kind: str):
    """Return transformers' mask function for ``"full_attention"`` or ``"sliding_attention"`` layers."""
    from transformers import masking_utils

    if kind == "sliding_attention":
        return masking_utils.create_sliding_window_causal_mask
    return masking_utils.create_causal_mask


def _no_cache(build, positions) -> dict:
    """Return the mask function's arguments for a training forward without a key-value cache.

    Releases up to 5.0 at least take ``cache_position`` and ``past_key_values``; later 5.x releases take ``cache``.
    """
    if "cache_position" in inspect.signature(build).parameters:
        return {"cache_position": positions[0], "past_key_values": None, "position_ids": positions}
    return {"cache": None, "position_ids": positions}
