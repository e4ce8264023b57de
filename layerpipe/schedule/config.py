"""The schedule configuration, validated once where it enters the program."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "interleaved", "breadth-first", "grouped", "zero-bubble")
"""Schedule names understood by ``build_schedule`` and the command line."""

PLACEMENTS = ("auto", "contiguous", "looping", "vshape")

REDUCE_ORDERS = ("priority", "bucketed")
"""How a stage's reduce portions are issued: interleaved by priority, or together when the stage finishes."""

RECOMPUTE_MODES = ("none", "full", "selective")
"""How a stage recomputes: not at all, all of it (stores its input only), or the regions its layers mark."""


class ConfigError(ValueError):
    """Bad user input; the message names the option, the value and what is valid."""


@dataclass(frozen=True)
class ScheduleConfig:
    """Everything that decides the programs of one training step.

    ``group_size`` is only for ``grouped``.  ``reduce_order`` is
    ``priority`` (portions interleaved, earliest layers complete first) or
    ``bucketed`` (each stage's portions together as it finishes, as DDP's
    buckets).  ``weight_buffers`` is how many
    gathered stage weight buffers a ZeRO-3 rank may hold at once (``None``:
    all of its stages, so each is gathered once per step).  ``recompute``
    lists the stages that store only their input during forward and
    recompute the rest before their backward.
    """

    schedule: str
    ranks: int
    microbatches: int
    stages_per_rank: int = 1
    group_size: int | None = None
    placement: str = "auto"
    data_parallel: int = 1
    zero: int = 0
    reduce_portions: int = 1
    weight_buffers: int | None = None
    recompute: tuple[int, ...] = ()
    reduce_order: str = "priority"

    @property
    def stages(self) -> int:
        """Return the total number of stages, ``ranks * stages_per_rank``."""
        return self.ranks * self.stages_per_rank

    def to_json(self) -> dict:
        """Return the configuration as a JSON-ready dictionary of its fields."""
        return {**self.__dict__, "recompute": list(self.recompute)}

    @property
    def placement_name(self) -> str:
        """Return the placement this configuration uses, with ``auto`` resolved."""
        if self.placement != "auto":
            return self.placement
        return "contiguous" if self.stages_per_rank == 1 else "looping"


def _positive(option: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{option} {value}: must be a positive whole number")


def interleaved_round_size(ranks: int, microbatches: int) -> int:
    """Return the micro-batches run per stage before switching, as torch's interleaved 1F1B does.

    That is ``m // max(1, m // p)``: ``p`` when ``p`` divides ``m``.
    """
    return microbatches // max(1, microbatches // ranks)


def validate_config(config: ScheduleConfig) -> ScheduleConfig:
    """Return ``config`` unchanged if it is consistent, else raise ``ConfigError``.

    The error names the command-line option, the value given and what would
    be valid, e.g. ``--group-size 3: must be between --ranks (4) and
    --microbatches (8)``.
    """
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule {config.schedule}: unknown; choose one of {', '.join(SCHEDULES)}")
    _positive("--ranks", config.ranks)
    _positive("--microbatches", config.microbatches)
    _positive("--stages-per-rank", config.stages_per_rank)
    _positive("--dp", config.data_parallel)
    _positive("--reduce-portions", config.reduce_portions)
    p, m, v = config.ranks, config.microbatches, config.stages_per_rank
    name = config.schedule

    if name in ("gpipe", "1f1b") and v != 1:
        raise ConfigError(f"--stages-per-rank {v}: {name} places one stage per rank; use 1, or a looping schedule "
                          "(interleaved, breadth-first, grouped, zero-bubble)")
    if config.group_size is not None and name != "grouped":
        raise ConfigError(f"--group-size {config.group_size}: only --schedule grouped takes a group size")
    if name == "grouped":
        if config.group_size is None:
            raise ConfigError(f"--group-size: --schedule grouped needs one, between --ranks ({p}) and --microbatches ({m})")
        _positive("--group-size", config.group_size)
        if m < p:
            raise ConfigError(f"--microbatches {m}: grouped needs at least --ranks ({p}) micro-batches")
        if not p <= config.group_size <= m:
            raise ConfigError(f"--group-size {config.group_size}: must be between --ranks ({p}) and --microbatches ({m})")
    if name in ("interleaved", "zero-bubble"):
        rounds = max(1, m // p)
        if m % rounds:
            raise ConfigError(f"--microbatches {m}: {name} with --ranks {p} needs a multiple of {rounds} "
                              f"(m // p rounds of equal size, as in torch.distributed.pipelining), e.g. {rounds * (m // rounds)}")

    if config.placement not in PLACEMENTS:
        raise ConfigError(f"--placement {config.placement}: unknown; choose one of {', '.join(PLACEMENTS)}")
    if config.placement == "vshape" and (name != "breadth-first" or v != 2):
        raise ConfigError(f"--placement vshape: needs --schedule breadth-first with --stages-per-rank 2 "
                          f"(got {name} with {v})")
    if config.placement == "contiguous" and v != 1:
        raise ConfigError(f"--placement contiguous: needs --stages-per-rank 1 (got {v})")
    if config.placement == "looping" and name in ("gpipe", "1f1b"):
        raise ConfigError(f"--placement looping: {name} runs on the contiguous placement")

    if config.reduce_order not in REDUCE_ORDERS:
        raise ConfigError(f"--reduce-order {config.reduce_order}: choose one of {', '.join(REDUCE_ORDERS)}")
    if config.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {config.zero}: must be 0, 1, 2 or 3")
    if config.weight_buffers is not None:
        _positive("--weight-buffers", config.weight_buffers)
    for stage in config.recompute:
        if not isinstance(stage, int) or not 0 <= stage < config.stages:
            raise ConfigError(f"--recompute {stage}: not a stage; stages are 0..{config.stages - 1}")
    return config
