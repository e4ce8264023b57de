"""The configuration of a training run: the schedule's knobs, the model's and the run's own, defined once.

``TrainConfig`` holds a ``ScheduleConfig`` and a ``GPTConfig`` instead of
copying their fields.  The command line and TOML files are flat: every knob
of the three is one option (``--stages-per-rank``) or one key
(``stages_per_rank = 2``), routed to the configuration that owns it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..knobs import (
    COMMAND_LINE,
    ConfigError,
    Spelling,
    check_fields,
    knob,
    knobs,
    number,
    one_of,
    optional,
    toml_spelling,
    whole,
)
from ..models.config import GPTConfig, LlamaDemoConfig, SuperResConfig
from ..ops.pattern import SPARSE_KERNELS, nm_pattern, parse_pattern
from ..options import Parser, add_knobs, given, read_toml
from ..run_options import PRECISIONS, check_precision, check_spatial, chunk_rule, seconds_rule
from ..schedule.config import ScheduleConfig, ranks_under_torchrun, validate_config
from .defaults import CLIP_GRAD_NORM, WARMUP_TEXT, default_clip_grad_norm, default_warmup
from .folders import check_init_from, check_output, check_resume, run_folder_of
from .metrics import tensorboard_folder

OPTIMIZERS = ("adamw", "sgd")
"""The optimizers ``layerpipe train`` can give every stage."""

MODELS = ("gpt", "superres", "llama")
"""The demos ``layerpipe train`` trains."""

SPARSITY_METHODS = ("fixed", "sr-ste")
"""How ``--sparsity`` trains: keep the first pattern, or let SR-STE change it."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is set up by; the defaults finish in about two minutes on two cores."""

    pipeline: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(ranks=2, clip_grad_norm=CLIP_GRAD_NORM))
    gpt: GPTConfig = field(default_factory=GPTConfig)
    superres: SuperResConfig = field(default_factory=SuperResConfig)
    llama: LlamaDemoConfig = field(default_factory=LlamaDemoConfig)
    model: str = knob(
        "gpt",
        "which demo to train: gpt (a character-level GPT on Shakespeare's plays), superres "
        "(2x super-resolution of the photographs scikit-image ships; needs the images extra) or llama "
        "(a Hugging Face Llama, or --hf-config's model, on the same text, --block-size characters a sequence; needs "
        "the hf extra)",
        check=one_of(MODELS),
        metavar="NAME",
    )
    spatial: int = knob(
        1,
        "split every image into this many bands of rows, one per process, and run each stage on "
        "them (--model superres; processes = ranks x data-parallel x spatial)",
        check=chunk_rule,
        metavar="S",
    )
    steps: int = knob(
        1000,
        "training steps (train_step calls; async updates each stage m/k times per call)",
        check=whole(1),
        metavar="N",
    )
    batch_size: int = knob(
        32, "sequences per step (a multiple of microbatches × data_parallel)", check=whole(1), metavar="N"
    )
    optimizer: str = knob(
        "adamw",
        "optimizer of every stage: adamw (betas 0.9, 0.99, weight decay 0.01) or sgd "
        "(momentum 0.9, which async's delay corrections read)",
        check=one_of(OPTIMIZERS),
        metavar="NAME",
    )
    learning_rate: float = knob(
        3e-3,
        "peak learning rate (reached after --warmup-steps, then cosine decay to a tenth)",
        check=number(0.0, above=True),
        metavar="RATE",
    )
    warmup_steps: int | None = knob(
        None,
        "steps of linear learning-rate warm-up before the cosine decay (0: none)",
        check=optional(whole(0)),
        metavar="N",
        default_text=WARMUP_TEXT,
    )
    seed: int = knob(0, "seed for weights and batches (the same on every rank)", check=whole(0), metavar="N")
    sample_length: int = knob(300, "characters of text to generate after training", check=whole(0), metavar="N")
    output: str = knob("layerpipe-run", "folder for summary.json, pictures, trace and checkpoints", metavar="DIR")
    timeout: float = knob(
        300.0,
        "seconds any rank may wait for a peer before it reports what it waits for",
        check=seconds_rule,
        metavar="SECONDS",
    )
    precision: str = knob(
        "fp32",
        "compute precision of the stages: fp32, bf16 or fp16 (float32 weights, gradients and "
        "optimizer state; fp16 scales the loss and needs --skip-nonfinite)",
        check=one_of(PRECISIONS),
        metavar="NAME",
    )
    broadcast_buffers: bool = knob(
        True,
        "after every step give the other data-parallel replicas replica 0's buffers (running statistics; the "
        "sparse layers' patterns, equal anyway: --no-broadcast-buffers saves their broadcast)",
    )
    max_skips: int = knob(
        10, "with --skip-nonfinite: stop after this many steps in a row were skipped", check=whole(1), metavar="N"
    )
    max_restarts: int = knob(
        0,
        "when a process fails, start the run again from its latest checkpoint, at most this "
        "many times (under torchrun, its own --max-restarts does it)",
        check=whole(0),
        metavar="R",
    )
    checkpoint_every: int = knob(
        0,
        "write a complete checkpoint to OUTPUT/checkpoints/step-N every N steps (0: only at the end)",
        check=whole(0),
        metavar="N",
    )
    keep: int = knob(2, "checkpoints to keep in OUTPUT/checkpoints (the latest ones)", check=whole(1), metavar="K")
    sparsity: str | None = knob(
        None,
        "train the blocks' linear layers N:M sparse, e.g. 2:4: at most N non-zero "
        "weights in every M inputs (the embedding and the output head stay dense)",
        check=nm_pattern,
        metavar="N:M",
        default_text="dense",
    )
    sparsity_method: str = knob(
        "fixed",
        "with --sparsity: fixed (the pattern pruned from the first weights stays) or "
        "sr-ste (dense weights whose pattern may change, Zhou et al. 2021)",
        check=one_of(SPARSITY_METHODS),
        metavar="NAME",
    )
    sparse_kernel: str = knob(
        "dense",
        "with --sparsity: dense (decompress, then dense BLAS: fast on a CPU) or gather "
        "(the metadata-driven gather an accelerator's loads do: the same numbers, much slower on a "
        "CPU)",
        check=one_of(SPARSE_KERNELS),
        metavar="NAME",
    )
    init_from: str | None = knob(
        None,
        "start from the weights of this checkpoint (a run's output folder or a step "
        "folder), e.g. a dense run to fine-tune sparse; the step, optimizer and data start "
        "anew",
        metavar="DIR",
        default_text="none",
    )
    tensorboard: str | None = knob(
        None,
        "write every step's loss, learning rate, step time, throughput and (with clipping) gradient norm, and the held-out loss, as TensorBoard "
        "scalars into this folder (tensorboard --logdir DIR; needs the extra layerpipe[tensorboard])",
        check=tensorboard_folder,
        metavar="DIR",
        default_text="none",
    )
    resume: str | None = knob(
        None,
        "continue the run whose output folder (or checkpoint step folder) this is, from "
        "its latest complete checkpoint; its summary and loss curve go on (a different --steps makes the "
        "learning rate's cosine span the new count from there on, and says so in one line)",
        metavar="DIR",
        default_text="none",
    )

    @property
    def warmup(self) -> int:
        """Return the warm-up steps of the run: ``warmup_steps``, or when not given the default for ``steps``."""
        return default_warmup(self.steps) if self.warmup_steps is None else self.warmup_steps

    @property
    def processes(self) -> int:
        """Return the number of processes the run needs: pipeline ranks × data-parallel replicas × spatial chunks."""
        return self.pipeline.ranks * self.pipeline.data_parallel * self.spatial

    def to_json(self) -> dict:
        """Return every knob as one flat JSON-ready dictionary (the keys a TOML file takes)."""
        return {
            **self.pipeline.to_json(),
            **{f.name: getattr(self.gpt, f.name) for f in knobs(GPTConfig)},
            **{f.name: getattr(self.superres, f.name) for f in knobs(SuperResConfig)},
            **self.llama.to_json(),
            **{f.name: getattr(self, f.name) for f in knobs(TrainConfig)},
            "warmup_steps": self.warmup,
        }


PARTS = (ScheduleConfig, GPTConfig, SuperResConfig, LlamaDemoConfig, TrainConfig)
"""The configurations whose knobs ``layerpipe train`` takes, in the order ``--help`` lists them."""


def build_parser(skip: Iterable[str] = ()) -> argparse.ArgumentParser:
    """Return the parser of ``layerpipe train``: one option per knob but those in ``skip``, defaults from
    ``TrainConfig()``."""
    parser = Parser(
        prog="layerpipe train",
        description="Train a small character-level GPT (or, with --model llama, a Hugging Face Llama or the model "
        "of --hf-config) with pipeline parallelism on local processes (or under torchrun) and write a summary, "
        "pictures, a trace and a checkpoint.",
        epilog="Options may also come from a TOML file (--config run.toml) whose keys are the option names "
        "with underscores, e.g. stages_per_rank = 2; options on the command line win.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of the options below")
    defaults = TrainConfig()
    add_knobs(
        parser.add_argument_group("schedule (ScheduleConfig)"),
        defaults.pipeline,
        shown={"clip_grad_norm": f"{CLIP_GRAD_NORM}, off for async; none: off"},
    )
    add_knobs(parser.add_argument_group("model (GPTConfig)"), defaults.gpt)
    add_knobs(parser.add_argument_group("super-resolution model (SuperResConfig)"), defaults.superres)
    add_knobs(parser.add_argument_group("Llama model (LlamaDemoConfig)"), defaults.llama)
    add_knobs(parser.add_argument_group("run"), defaults, skip=skip)
    return parser


def config_from(arguments: argparse.Namespace, world: int | None = None, writes_output: bool = True) -> TrainConfig:
    """Return the configuration from a TOML file and command-line options; refuse bad values with ``ConfigError``.

    The error names the knob in the spelling of where its value came from
    (``--ranks 0`` or ``run.toml: ranks = 0``).  ``world``, under torchrun,
    is the number of processes it started: it sets ``ranks`` to ``world /
    data_parallel``, and a different ``--ranks`` is refused.  With
    ``writes_output`` (training does; calibrating does not) the output
    folder is made and checked.
    """
    values: dict[type, dict[str, Any]] = {cls: {} for cls in PARTS}
    spelling: dict[str, Spelling] = {}
    try:
        if arguments.config:
            for cls, found in read_toml(arguments.config, PARTS).items():
                values[cls].update(found)
                spelling.update({name: toml_spelling(arguments.config) for name in found})
        for cls in PARTS:
            found = given(arguments, cls)
            values[cls].update(found)
            spelling.update({name: COMMAND_LINE for name in found})
        if world is not None:
            values[ScheduleConfig]["ranks"] = ranks_under_torchrun(
                values[ScheduleConfig], world, values[TrainConfig].get("spatial", 1)
            )
        resume = values[TrainConfig].get("resume")
        if resume is not None and "output" not in values[TrainConfig]:
            values[TrainConfig]["output"] = run_folder_of(resume)
        pipeline = ScheduleConfig(**{"ranks": 2, **values[ScheduleConfig]})
        if "clip_grad_norm" not in values[ScheduleConfig]:
            pipeline = dataclasses.replace(pipeline, clip_grad_norm=default_clip_grad_norm(pipeline))
        config = TrainConfig(
            pipeline=pipeline,
            gpt=GPTConfig(**values[GPTConfig]),
            superres=SuperResConfig(**values[SuperResConfig]),
            llama=LlamaDemoConfig(**values[LlamaDemoConfig]),
            **values[TrainConfig],
        )
        check_config(config)
        if writes_output:
            check_output(config.output)
    except ConfigError as error:
        raise error.spelled(spelling.get(error.field, COMMAND_LINE)) from None
    return config


def check_config(config: TrainConfig) -> None:
    """Refuse, with ``ConfigError`` naming the knob, a configuration that cannot train."""
    schedule = config.pipeline
    check_precision(
        config.precision, schedule.streams, schedule.skip_nonfinite
    )  # before the schedule's own rules: one line
    validate_config(config.pipeline)
    check_fields(config.gpt)
    check_fields(config.superres)
    check_fields(config.llama)
    check_fields(config)
    check_spatial(config.spatial, schedule.streams)
    if schedule.delay_correction not in (None, "none") and config.optimizer != "sgd":
        raise ConfigError(
            "delay_correction",
            schedule.delay_correction,
            f"reads SGD's momentum, and the optimizer is {config.optimizer}: add `optimizer` sgd, or use none",
        )
    if config.batch_size % (schedule.microbatches * schedule.data_parallel):
        raise ConfigError(
            "batch_size",
            config.batch_size,
            f"must be a multiple of `microbatches` "
            f"({schedule.microbatches}) × `data_parallel` ({schedule.data_parallel})",
        )
    if config.warmup_steps is not None and config.warmup_steps >= config.steps:
        raise ConfigError(
            "warmup_steps", config.warmup_steps, f"must be below `steps` ({config.steps}): the cosine decay follows it"
        )
    MODEL_CHECKS[config.model](config)
    for name, value in _changed(config.llama, LlamaDemoConfig())[:1] if config.model != "llama" else ():
        raise ConfigError(name, value, "applies to `model` llama only")
    if config.resume is not None:
        check_resume(config.resume)
    if config.init_from is not None and config.model != "llama":  # the Llama's folder is checked by its sizes
        check_init_from(config.init_from, config.gpt)


def _check_gpt(config: TrainConfig) -> None:
    schedule, model = config.pipeline, config.gpt
    if model.tie_embeddings and schedule.stages > 1:  # the schedule's own rule for the tie the pipeline will find
        validate_config(dataclasses.replace(schedule, ties=((0, schedule.stages - 1),)))
    if config.spatial > 1:
        raise ConfigError(
            "spatial",
            config.spatial,
            "the GPT's layers see whole sequences, not bands of rows: use it with `model` superres",
        )
    if model.width % model.heads:
        raise ConfigError("heads", model.heads, f"must divide `width` ({model.width})")
    if model.length_buckets > model.block_size or (model.length_buckets and schedule.streams):
        why = "async streams one shape: use a flushed schedule" if schedule.streams else "at most `block_size`"
        raise ConfigError("length_buckets", model.length_buckets, f"{why} ({model.block_size})")
    if model.blocks + 2 < schedule.stages:
        raise ConfigError(
            "blocks",
            model.blocks,
            f"the model has {model.blocks + 2} layers but {schedule.stages} "
            f"stages (`ranks` × `stages_per_rank`) need one each: use {schedule.stages - 2} or more",
        )
    if config.sparsity is not None and model.width % parse_pattern(config.sparsity, "sparsity").m:
        raise ConfigError(
            "sparsity",
            config.sparsity,
            f"M must divide `width` ({model.width}), the input size of the blocks' linear layers",
        )


SUPERRES_LAYERS = 6
"""Layers of the super-resolution network (head, down, body, up, up, tail)."""


def _check_superres(config: TrainConfig) -> None:
    schedule = config.pipeline
    _refuse_gpt_only(config)
    if SUPERRES_LAYERS < schedule.stages:
        raise ConfigError(
            "stages_per_rank",
            schedule.stages_per_rank,
            f"the super-resolution network has "
            f"{SUPERRES_LAYERS} layers but `ranks` × `stages_per_rank` = {schedule.stages} stages",
        )
    if (config.superres.crop // 2) % (2 * config.spatial):
        raise ConfigError(
            "crop",
            config.superres.crop,
            f"its low-resolution half must split into `spatial` "
            f"({config.spatial}) bands of an even number of rows: use a multiple of "
            f"{4 * config.spatial}",
        )


def _refuse_gpt_only(config: TrainConfig) -> None:
    for name in ("sparsity", "init_from"):
        if getattr(config, name) is not None:
            raise ConfigError(name, getattr(config, name), GPT_ONLY)


GPT_ONLY = "applies to `model` gpt only"


def _check_llama(config: TrainConfig) -> None:
    from ..models.llama import check_init_from as check_llama_folder
    from ..models.llama import check_llama, check_transformers

    check_transformers("model", config.model)
    if config.sparsity is not None:
        raise ConfigError("sparsity", config.sparsity, GPT_ONLY)
    if config.spatial > 1:
        raise ConfigError("spatial", config.spatial, "the Llama's layers see whole sequences, not bands of rows")
    for name, value in _changed(config.gpt, GPTConfig(), keep=("block_size",))[:1]:  # the text demos share it
        instead = LLAMA_SIZES.get(name)
        raise ConfigError(name, value, f"sizes `model` gpt: the Llama's is `{instead}`" if instead else GPT_ONLY)
    if "selective" in config.pipeline.recompute_modes:
        raise ConfigError(
            "recompute",
            config.pipeline.recompute,
            "the Llama's layers mark no region to recompute selectively (its sdpa attention keeps no attention "
            "weights): use full or none",
        )
    check_llama(config.llama, config.gpt.block_size, config.pipeline)
    if config.init_from is not None:
        check_llama_folder(config.init_from, config.llama, config.gpt.block_size)


def _changed(part, default, keep=()) -> list[tuple[str, object]]:
    """Return the knobs of ``part`` (a model's configuration) that differ from ``default``'s, but those in ``keep``."""
    return [
        (f.name, getattr(part, f.name))
        for f in knobs(type(part))
        if f.name not in keep and getattr(part, f.name) != getattr(default, f.name)
    ]


LLAMA_SIZES = {"width": "llama_width", "heads": "llama_heads", "blocks": "llama_layers"}
"""The Llama's knob in place of each GPT size (a GPT size given with ``model`` llama is refused, naming it)."""

MODEL_CHECKS = {"gpt": _check_gpt, "superres": _check_superres, "llama": _check_llama}
"""What each demo of ``MODELS`` refuses beyond the knobs' own rules."""


def replaced(config: TrainConfig, **changes: Any) -> TrainConfig:
    """Return ``config`` with knobs changed by name, whichever part (schedule, model, run) owns them."""
    parts = {cls: {} for cls in PARTS}
    owners = {f.name: cls for cls in PARTS for f in knobs(cls)}
    for name, value in changes.items():
        parts[owners[name]][name] = value
    return dataclasses.replace(
        config,
        pipeline=dataclasses.replace(config.pipeline, **parts[ScheduleConfig]),
        gpt=dataclasses.replace(config.gpt, **parts[GPTConfig]),
        superres=dataclasses.replace(config.superres, **parts[SuperResConfig]),
        llama=dataclasses.replace(config.llama, **parts[LlamaDemoConfig]),
        **parts[TrainConfig],
    )
