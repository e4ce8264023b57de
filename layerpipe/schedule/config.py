"""The schedule configuration: every knob that decides the programs of one training step, defined once.

Each field carries its help and its own validity rule (``layerpipe.knobs``);
``validate_config`` adds the rules that relate fields to each other.  The
command line, TOML files and ``layerpipe.Pipeline`` all read these fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..knobs import ConfigError, check_fields, knob, number, one_of, optional, whole
from . import generators  # noqa: F401  (registers the built-in schedules before the knobs below list them)
from .asynchronous import ASYNC_OPTIONS
from .registry import ScheduleNames, ScheduleRecord, schedule_record, schedule_records
from .ties import check_ties

__all__ = [
    "DELAY_CORRECTIONS",
    "ONE_STAGE_SCHEDULES",
    "PLACEMENTS",
    "RECOMPUTE_MODES",
    "REDUCE_ORDERS",
    "SCHEDULES",
    "SPLITTING_SCHEDULES",
    "STEP_PLACEMENTS",
    "WEIGHT_POLICIES",
    "ConfigError",
    "ScheduleConfig",
    "pipeline_ranks",
    "validate_config",
]

SCHEDULES = ScheduleNames()
"""Schedule names understood by ``build_schedule`` and the command line, read from the registry (``async``:
pipelined backpropagation, a stream of sub-minibatches that never drains between steps)."""

ONE_STAGE_SCHEDULES = ScheduleNames(lambda record: record.family == "contiguous")
"""Schedules that place one stage per rank; the others loop ``stages_per_rank`` stages over the ranks."""

SPLITTING_SCHEDULES = ScheduleNames(lambda record: record.splits_backward)
"""Schedules whose programs split ``B`` into ``I`` and ``W`` (zero-bubble)."""

PLACEMENTS = ("auto", "contiguous", "looping", "vshape")

REDUCE_ORDERS = ("priority", "bucketed", "after-flush")
"""When a stage's reduce portions are issued: interleaved by priority or together as the stage finishes, or every
stage's after the rank's last backward."""

WEIGHT_POLICIES = ("stashed", "double-buffered", "live")
"""Async only: which weights a sub-minibatch's backward uses (``runtime.stream.versions`` says how)."""

DELAY_CORRECTIONS = ("none", "spike", "predict", "spike+predict")
"""Async only: how a stage corrects for its delay (``runtime.stream.delay`` gives the formulas)."""

STEP_PLACEMENTS = ("end", "early")
"""Where a stage's optimizer ``STEP`` goes: every stage's at the end, or each after the next stage's reduce."""

RECOMPUTE_MODES = ("none", "full", "selective")
"""How a stage recomputes: not at all, all of it (stores its input only), or the regions its layers mark."""


def _recompute_rule(value: object) -> str | None:
    modes = (value,) if isinstance(value, str) else value
    if not isinstance(modes, tuple) or not modes or any(mode not in RECOMPUTE_MODES for mode in modes):
        return f"choose one of {', '.join(RECOMPUTE_MODES)} for every stage but the last, or one per stage (comma-separated)"
    return None


@dataclass(frozen=True)
class ScheduleConfig:
    """Everything that decides the programs of one training step (see each field's help)."""

    schedule: str = knob(
        "breadth-first", "pipeline schedule: " + ", ".join(SCHEDULES), check=one_of(SCHEDULES), metavar="NAME"
    )
    ranks: int = knob(
        4, "pipeline ranks P (a run has P × data_parallel processes)", check=whole(1), metavar="P", short="-p"
    )
    microbatches: int = knob(
        8, "micro-batches per step M (per data-parallel replica)", check=whole(1), metavar="M", short="-m"
    )
    stages_per_rank: int | None = knob(
        None,
        "stages on each rank V; looping placement puts stage s on rank s % P",
        check=optional(whole(1)),
        metavar="V",
        short="-v",
        default_text="1 for gpipe and 1f1b, 2 for the looping schedules",
    )
    group_size: int | None = knob(
        None,
        "grouped only: micro-batches run per stage before switching, P <= N <= M "
        "(N = P is interleaved, N = M breadth-first)",
        check=optional(whole(1)),
        metavar="N",
        short="-n",
        default_text="none; grouped needs one",
    )
    placement: str = knob(
        "auto",
        "stage placement: " + ", ".join(PLACEMENTS) + "; vshape puts stages r and 2P-1-r "
        "on rank r (V = 2: breadth-first, and the V schedules, which run on nothing else); auto is the V "
        "schedules' vshape, else contiguous for V = 1 and looping above",
        check=one_of(PLACEMENTS),
        metavar="NAME",
    )
    data_parallel: int = knob(
        1,
        "data-parallel replicas D of the pipeline; each trains on its share of the batch",
        check=whole(1),
        metavar="D",
    )
    zero: int = knob(
        0,
        "sharding over the replicas (needs D > 1): 0 replicated, 1 optimizer state, 2 and gradients, 3 and weights",
        check=one_of((0, 1, 2, 3)),
        metavar="LEVEL",
    )
    reduce_portions: int = knob(
        1, "portions each stage's gradient reduce is split into (needs D > 1)", check=whole(1), metavar="K"
    )
    reduce_order: str = knob(
        "priority",
        "priority: portions interleaved so the earliest layers complete first; "
        "bucketed: a stage's portions together as it finishes, like DDP's buckets; "
        "after-flush: every stage's once the rank's backward is over, as Megatron-LM without "
        "--overlap-grad-reduce",
        check=one_of(REDUCE_ORDERS),
        metavar="ORDER",
    )
    step_placement: str = knob(
        "end",
        "where each stage's optimizer STEP goes: end (every stage after the last "
        "backward) or early (after the reduce of the next stage the rank finishes, so an "
        "update runs while the rank's earlier stages still compute, and ZeRO-2/3 frees the "
        "stage's full gradients there)",
        check=one_of(STEP_PLACEMENTS),
        metavar="WHERE",
    )
    weight_buffers: int | None = knob(
        None,
        "gathered stage weight buffers a rank may hold at once (zero 3 only)",
        check=optional(whole(1)),
        metavar="K",
        default_text="all of the rank's stages",
    )
    update_every: int | None = knob(
        None,
        "async only: each stage updates its weights after this many of its "
        "backwards (k; the virtual minibatch is k sub-minibatches)",
        check=optional(whole(1)),
        metavar="K",
        default_text="1 for async",
    )
    weight_policy: str | None = knob(
        None,
        "async only: which weights a backward uses: stashed (its forward's, "
        "PipeDream), double-buffered (at most two versions, PipeDream-2BW; needs "
        "K >= 2(P-1)) or live (the current ones)",
        check=optional(one_of(WEIGHT_POLICIES)),
        metavar="POLICY",
        default_text="stashed for async",
    )
    delay_correction: str | None = knob(
        None,
        "async only: correction of the delay, for SGD with momentum: none, "
        "spike (spike compensation), predict (linear weight prediction) or "
        "spike+predict (Kosson et al., 2021)",
        check=optional(one_of(DELAY_CORRECTIONS)),
        metavar="NAME",
        default_text="none for async",
    )
    delay_warmup: int | None = knob(
        None,
        "async only: updates over which a delayed stage's learning rate rises "
        "from 1/(its staleness in updates) to the full rate (PipeMare); 0 for none",
        check=optional(whole(0)),
        metavar="UPDATES",
        default_text="0 for async",
    )
    skip_nonfinite: bool = knob(
        False,
        "guard each step: when any gradient on any process is not finite, every "
        "rank skips the optimizer step together (a GUARD before the steps)",
    )
    clip_grad_norm: float | None = knob(
        None,
        "clip the gradients by their global 2-norm over the whole model to at most this, as "
        "torch.nn.utils.clip_grad_norm_ on one process (a CLIP before the steps, one all-reduce "
        "that also guards: a norm that is not finite skips the step on every rank)",
        check=optional(number(0.0, above=True)),
        metavar="MAX_NORM",
        default_text="off",
    )
    recompute: str | tuple[str, ...] = knob(
        "none",
        "activation recomputation: none, full or selective for every "
        "stage but the last, or one mode per stage, comma-separated",
        check=_recompute_rule,
        metavar="MODE",
    )

    ties: tuple[tuple[int, ...], ...] = ()
    """Tie groups (``schedule.ties``): the stages holding each parameter tied across stages, found by the runtime
    from the layers (not a knob: no command line or TOML spelling)."""

    def __post_init__(self) -> None:
        record = self.record
        if self.stages_per_rank is None:
            chosen = record.default_stages_per_rank if record is not None else 2
            object.__setattr__(self, "stages_per_rank", chosen)
        for name, default in record.options.items() if record is not None else ():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if isinstance(self.recompute, str) and "," in self.recompute:
            object.__setattr__(self, "recompute", tuple(part.strip() for part in self.recompute.split(",")))
        elif isinstance(self.recompute, list):
            object.__setattr__(self, "recompute", tuple(self.recompute))

    @property
    def record(self) -> ScheduleRecord | None:
        """Return the registry's record of this schedule (``None`` for a name no schedule has)."""
        return schedule_record(self.schedule)

    @property
    def streams(self) -> bool:
        """Return whether the schedule is a stream that never drains between calls (async)."""
        record = self.record
        return record is not None and record.streams

    @property
    def stages(self) -> int:
        """Return the total number of stages, ``ranks * stages_per_rank``."""
        return self.ranks * self.stages_per_rank

    @property
    def recompute_modes(self) -> tuple[str, ...]:
        """Return the recomputation mode of every stage (one mode given applies to every stage but the last)."""
        if isinstance(self.recompute, str):
            return tuple(self.recompute if stage < self.stages - 1 else "none" for stage in range(self.stages))
        return tuple(self.recompute)

    @property
    def recomputed_stages(self) -> tuple[int, ...]:
        """Return the stages that recompute (mode ``full`` or ``selective``)."""
        return tuple(stage for stage, mode in enumerate(self.recompute_modes) if mode != "none")

    @property
    def placement_name(self) -> str:
        """Return the placement this configuration uses, with ``auto`` resolved."""
        if self.placement != "auto":
            return self.placement
        if self.record is not None and self.record.default_placement is not None:
            return self.record.default_placement
        return "contiguous" if self.stages_per_rank == 1 else "looping"

    def to_json(self) -> dict:
        """Return the configuration as a JSON-ready dictionary of its fields."""
        recompute = self.recompute if isinstance(self.recompute, str) else list(self.recompute)
        fields = {**self.__dict__, "recompute": recompute}
        if not self.ties:
            del fields["ties"]  # set by the runtime from the layers; written only where there are some
        return fields


ASYNC_DEFAULTS = ASYNC_OPTIONS
"""The async schedule's own options and their defaults (its record's ``options``); other schedules refuse them."""


def pipeline_ranks(processes: int, data_parallel: object) -> int:
    """Return the pipeline ranks of ``processes`` processes split into ``data_parallel`` replicas.

    Refuses, with ``ConfigError`` on ``data_parallel``, a value that is not a
    whole number dividing the process count.
    """
    if whole(1)(data_parallel) is not None or processes % data_parallel:
        raise ConfigError(
            "data_parallel",
            data_parallel,
            f"must divide the {processes} processes (processes = pipeline ranks × data_parallel)",
        )
    return processes // data_parallel


def ranks_under_torchrun(schedule_values: dict, world: int, spatial: int) -> int:
    """Return the pipeline ranks of the ``world`` processes torchrun started (given ``data_parallel`` and ``spatial``);
    refuse, with ``ConfigError`` on ``ranks``, a given ``ranks`` that disagrees."""
    data_parallel = schedule_values.get("data_parallel", 1)
    ranks = pipeline_ranks(world // spatial if world % spatial == 0 else world, data_parallel)
    if schedule_values.get("ranks", ranks) != ranks:
        raise ConfigError(
            "ranks",
            schedule_values["ranks"],
            f"torchrun started {world} processes = `ranks` × "
            f"`data_parallel` ({data_parallel}) × `spatial` ({spatial}); leave `ranks` out or make "
            f"them agree",
        )
    return ranks


def validate_config(config: ScheduleConfig) -> ScheduleConfig:
    """Return ``config`` unchanged if it is consistent, else raise ``ConfigError``.

    Each field's own rule first, then the rules between fields.  The error
    names the field, the value and what would be valid, e.g. ``group_size=3:
    must be between ranks (4) and microbatches (8)``.
    """
    check_fields(config)
    _check_stages(config)
    _check_placement(config)
    _check_clip(config)
    _check_data_parallel(config)
    _check_recompute(config)
    _check_ties(config)
    if config.record.rules is not None:
        config.record.rules(config)
    return config


def _check_stages(config: ScheduleConfig) -> None:
    name, v = config.schedule, config.stages_per_rank
    if config.record.family == "contiguous" and v != 1:
        looping = ", ".join(record.name for record in schedule_records() if record.family == "looping")
        raise ConfigError(
            "stages_per_rank", v, f"{name} places one stage per rank; use 1, or a looping schedule ({looping})"
        )
    _check_options(config)


_OPTION_WORDS = {"group_size": "a group size"}
"""How the refusal of an option another schedule takes names it (``it`` when not here)."""


def _check_options(config: ScheduleConfig) -> None:
    """Refuse an option given to a schedule whose record does not take it, naming the schedules that do."""
    for record in schedule_records():
        for option in record.options:
            value = getattr(config, option)
            if value is not None and option not in config.record.options:
                owners = " or ".join(other.name for other in schedule_records() if option in other.options)
                raise ConfigError(option, value, f"only the {owners} schedule takes {_OPTION_WORDS.get(option, 'it')}")


def _check_placement(config: ScheduleConfig) -> None:
    name, v, placements = config.schedule, config.stages_per_rank, config.record.placements
    if config.placement == "vshape" and ("vshape" not in placements or v != 2):
        takers = " or ".join(record.name for record in schedule_records() if "vshape" in record.placements)
        raise ConfigError(
            "placement", "vshape", f"needs the {takers} schedule with `stages_per_rank` 2 (got {name} with {v})"
        )
    if config.placement in ("contiguous", "looping") and config.placement not in placements:
        raise ConfigError("placement", config.placement, f"{name} runs on the {' or '.join(placements)} placement")
    if config.placement == "contiguous" and v != 1:
        raise ConfigError("placement", "contiguous", f"needs `stages_per_rank` 1 (got {v})")


def _check_data_parallel(config: ScheduleConfig) -> None:
    if config.data_parallel == 1:
        if config.zero:
            raise ConfigError("zero", config.zero, "shards over data-parallel replicas: needs `data_parallel` above 1")
        if config.reduce_portions != 1:
            raise ConfigError(
                "reduce_portions",
                config.reduce_portions,
                "splits the reduce over data-parallel replicas: needs `data_parallel` above 1",
            )
        if config.reduce_order != "priority":
            raise ConfigError(
                "reduce_order",
                config.reduce_order,
                "orders the reduces over data-parallel replicas: needs `data_parallel` above 1",
            )
    if config.step_placement == "early" and config.skip_nonfinite:
        raise ConfigError(
            "step_placement",
            "early",
            "the guard of `skip_nonfinite` decides every step together, after the last backward: use end with it",
        )
    if config.step_placement == "early" and config.reduce_order == "after-flush":
        raise ConfigError(
            "step_placement",
            "early",
            "steps early after each stage's reduce, and `reduce_order` "
            "after-flush holds every reduce until the backward is over: use end with it",
        )
    if config.weight_buffers is not None and config.zero != 3:
        raise ConfigError("weight_buffers", config.weight_buffers, "bounds gathered weights: needs `zero` 3")


def _check_clip(config: ScheduleConfig) -> None:
    """Refuse clipping where no step waits for the whole model's gradient norm: async, and early steps."""
    if config.clip_grad_norm is None:
        return
    if config.streams:
        raise ConfigError(
            "clip_grad_norm",
            config.clip_grad_norm,
            "async updates each stage on its own, with no step of the whole model to clip together: leave it off",
        )
    if config.step_placement == "early":
        raise ConfigError(
            "step_placement",
            "early",
            "`clip_grad_norm` needs the whole model's gradient norm before any step: use end with it",
        )


def _check_ties(config: ScheduleConfig) -> None:
    """Refuse tie groups that are not groups of stages, and ties where no step of the whole model sums them."""
    if not config.ties:
        return
    reason = check_ties(config.ties, config.stages)
    if reason is not None:
        raise ConfigError("ties", config.ties, reason)
    if config.streams:
        raise ConfigError(
            "schedule",
            config.schedule,
            "async updates each stage on its own, so the copies of a parameter tied across stages "
            f"{list(config.ties[0])} would drift apart: use a flushed schedule, or put the holders on one stage",
        )
    if config.step_placement == "early":
        raise ConfigError(
            "step_placement",
            "early",
            f"a parameter tied across stages {list(config.ties[0])} sums its gradient after every backward, "
            "before any holder steps: use end with it",
        )


def _check_recompute(config: ScheduleConfig) -> None:
    modes = config.recompute_modes
    if len(modes) != config.stages:
        raise ConfigError(
            "recompute", config.recompute, f"give one mode for each of the {config.stages} stages, or one mode for all"
        )
    if modes[-1] != "none":
        raise ConfigError(
            "recompute",
            config.recompute,
            f"the last stage ({config.stages - 1}) cannot recompute: it "
            f"computes the loss gradient from its own forward, and recomputation runs after that gradient",
        )
