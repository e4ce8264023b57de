"""The model of ``layerpipe train --model llama``: a Hugging Face causal LM built from a configuration, split by
``layerpipe.hf.split``.

By default a small Llama whose sizes are the ``--llama-*`` knobs
(``LlamaDemoConfig``); with ``--hf-config FILE`` the configuration a user
wrote for a covered family (Llama, Mistral, Qwen2, Qwen3, GPT-2).  Either
way the vocabulary becomes the text's characters; the model is built on the
meta device and each process materialises its own layers by the model's own
initialisation under the run's seed (or loads them from ``--init-from``'s
``save_pretrained`` folder), and nothing is downloaded.  transformers (the extra ``hf``) is imported only when a
function here runs, so ``layerpipe train --help`` stays quick.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

from ..knobs import ConfigError
from ..schedule.config import ScheduleConfig, validate_config
from .config import LlamaDemoConfig

HF_EXTRA = "install the extra with pip install 'layerpipe[hf]'"
"""How a refusal says where transformers comes from."""

DESCRIBED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
)
"""The configuration entries a run's summary names the model by (those the configuration has)."""


def check_transformers(field: str, value) -> None:
    """Refuse, with ``ConfigError`` on ``field``, a run that needs transformers where it is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(field, value, f"needs the transformers package: {HF_EXTRA}")


def check_llama(sizes: LlamaDemoConfig, block_size: int, schedule: ScheduleConfig) -> None:
    """Refuse, with ``ConfigError`` naming the knob, sizes that do not make a model or do not fill ``stages`` stages.

    Without ``hf_config``: heads that do not divide the width, key-value heads
    that do not divide the heads.  With it: what ``_check_hf_config`` refuses.
    Either way, fewer layers than stages, and a tied head on a schedule that cannot sum a tie.
    """
    stages = schedule.stages
    if sizes.hf_config is None:
        if sizes.llama_width % sizes.llama_heads:
            raise ConfigError("llama_heads", sizes.llama_heads, f"must divide `llama_width` ({sizes.llama_width})")
        if sizes.llama_heads % sizes.llama_kv_heads:
            raise ConfigError(
                "llama_kv_heads", sizes.llama_kv_heads, f"must divide `llama_heads` ({sizes.llama_heads})"
            )
        field, layers = "llama_layers", sizes.llama_layers
    else:
        field, layers = "hf_config", _check_hf_config(sizes, block_size)
        if (
            getattr(read_hf_config(sizes.hf_config), "tie_word_embeddings", False) and stages > 1
        ):  # the schedule's rule for the tie
            validate_config(dataclasses.replace(schedule, ties=((0, stages - 1),)))
    if layers + 2 < stages:
        raise ConfigError(
            field,
            getattr(sizes, field),
            f"the model has {layers + 2} layers (embedding, {layers} decoder layers, norm and head) but {stages} "
            f"stages (`ranks` × `stages_per_rank`) need one each",
        )


def _check_hf_config(sizes: LlamaDemoConfig, block_size: int) -> int:
    """Return the decoder layers of ``sizes.hf_config``'s model; refuse, with ``ConfigError``, what
    ``read_hf_config`` refuses, a ``llama_*`` size given beside it, a model transformers cannot build (tried on
    the meta device: nothing allocated) and a ``block_size`` past the model's positions."""
    default = LlamaDemoConfig()
    for name in ("llama_width", "llama_layers", "llama_heads", "llama_kv_heads", "llama_mlp_width"):
        if getattr(sizes, name) != getattr(default, name):
            raise ConfigError(
                name, getattr(sizes, name), f"the model's sizes come from `hf_config` ({sizes.hf_config}): leave it out"
            )
    config = read_hf_config(sizes.hf_config)
    try:
        describe(_for_the_text(config, config.vocab_size), sizes.hf_config)
    except Exception as error:  # transformers' own failure, on one line
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise ConfigError("hf_config", sizes.hf_config, f"transformers cannot build its model ({reason})") from None
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and block_size > positions:
        raise ConfigError(
            "block_size",
            block_size,
            f"the model of `hf_config` ({sizes.hf_config}) has {positions} positions (max_position_embeddings)",
        )
    return config.num_hidden_layers


def read_hf_config(path: str):
    """Return the transformers configuration a ``config.json`` (or a folder holding one) describes.

    Read as JSON and built by ``transformers.AutoConfig.for_model`` (nothing
    downloaded); its ``dtype`` is dropped (weights are float32; ``--precision``
    sets the compute).  Refuses, with ``ConfigError`` on ``hf_config`` in one
    line: a missing or unreadable file, one that is not a JSON object, no or an
    unknown ``model_type``, a model class ``layerpipe.hf.split`` does not
    cover (named), a configuration transformers refuses and key-value heads
    that do not divide the heads.  A head tied to the input embedding stays
    tied: the pipeline keeps a copy on the first and last stage and sums their
    gradients (a ``TIE``).
    """
    data = _json_object(path)
    model_type = data.pop("model_type", None)
    for key in ("torch_dtype", "dtype"):
        data.pop(key, None)
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..hf import COVERED

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        found = (
            "names no model_type"
            if model_type is None
            else f"has model_type {model_type!r}, which transformers does not know"
        )
        raise ConfigError("hf_config", path, f'{found}: give that of a covered family, e.g. "llama"')
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name not in COVERED:
        built = f"builds {name}" if name else f"(model_type {model_type!r}) has no causal language model"
        raise ConfigError(
            "hf_config", path, f"{built}, which layerpipe.hf.split does not cover: it covers {', '.join(COVERED)}"
        )
    try:
        config = AutoConfig.for_model(model_type, **data)
    except Exception as error:  # transformers' own validation: its words, on one line
        reason = " ".join(str(error).split())
        raise ConfigError("hf_config", path, f"transformers refuses it as a {name} config: {reason}") from None
    heads, kv_heads = getattr(config, "num_attention_heads", 1), getattr(config, "num_key_value_heads", None)
    if kv_heads and heads % kv_heads:
        raise ConfigError(
            "hf_config", path, f"num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})"
        )
    return config


def _json_object(path: str) -> dict:
    """Return the JSON object in ``path`` (or ``path/config.json``); refuse what is not one, with ``ConfigError``."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ConfigError("hf_config", path, "holds no config.json" if file != path else "no such file") from None
    except OSError as error:
        raise ConfigError("hf_config", path, f"cannot be read ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("hf_config", path, f"is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError("hf_config", path, "is not a JSON object of configuration entries")
    return data


def demo_config(sizes: LlamaDemoConfig, vocab_size: int, block_size: int):
    """Return the transformers configuration of the demo: ``sizes.hf_config``'s, or a ``LlamaConfig`` of ``sizes``.

    Either way the vocabulary is ``vocab_size`` characters, with no padding
    token (a character may have any id), and no key-value cache is kept.
    """
    import transformers

    if sizes.hf_config is not None:
        config = read_hf_config(sizes.hf_config)
    else:
        config = transformers.LlamaConfig(
            hidden_size=sizes.llama_width,
            intermediate_size=sizes.llama_mlp_width,
            num_hidden_layers=sizes.llama_layers,
            num_attention_heads=sizes.llama_heads,
            num_key_value_heads=sizes.llama_kv_heads,
            max_position_embeddings=block_size,
            tie_word_embeddings=False,
        )
    return _for_the_text(config, vocab_size)


def _for_the_text(config, vocab_size: int):
    """Return ``config`` with a vocabulary of ``vocab_size`` characters, no padding token (a character may have
    any id) and no key-value cache."""
    config.vocab_size, config.pad_token_id, config.use_cache = vocab_size, None, False
    return config


def describe(config, hf_config: str | None) -> dict:
    """Return the summary's description of the model: its class, parameter count and sizes (built on the meta
    device: nothing allocated)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    sizes = {key: getattr(config, key) for key in DESCRIBED if getattr(config, key, None) is not None}
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return {"class": type(model).__name__, "hf_config": hf_config, "parameters": parameters, **sizes}


def llama_layers(config) -> list:
    """Return ``layerpipe.hf.split`` of the float32 causal LM ``config`` describes, built on the meta device: the
    pipeline materialises each process's own layers by the model's initialisation under ``Pipeline(seed=...)``."""
    import torch
    import transformers

    from ..hf import split

    with torch.device("meta"):
        return split(transformers.AutoModelForCausalLM.from_config(config).float())


def check_init_from(folder: str, sizes: LlamaDemoConfig, block_size: int) -> None:
    """Refuse, with ``ConfigError`` on ``init_from`` in one line, a folder that is not a ``save_pretrained`` folder
    (or ``layerpipe export``'s) of the demo's model of ``sizes``, naming the first tensor that does not fit."""
    from ..hf_weights import check_folder, is_hf_folder
    from .text import CharacterText, load_corpus

    if not is_hf_folder(folder):
        raise ConfigError(
            "init_from",
            folder,
            "is no folder written by save_pretrained (config.json and model.safetensors): for `model` llama give "
            "one of the same sizes and the text's characters as vocabulary, e.g. from `layerpipe export`",
        )
    config = demo_config(sizes, CharacterText.from_text(*load_corpus()).vocab_size, block_size)
    check_folder(llama_layers(config), folder)
