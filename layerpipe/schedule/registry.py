"""The schedule registry: one record per schedule, registered next to its generator.

Everything that depends on which schedules exist reads this table: the
names (``SCHEDULES``), the generators, the schedule-specific rules of
``validate_config``, the command line's choices, the gallery and the
tests' schedule lists.  Adding a schedule is one generator and one
``register`` call (``schedule/generators.py`` holds the built-in ones;
``schedule.config`` imports it, so the built-ins are registered wherever a
configuration exists).  A schedule registered later (a test, a plugin) is
listed, accepted and built too, but the ``--schedule`` help text is written
when ``schedule.config`` is first imported, and processes started with
``spawn`` know only what their imports register.  Nothing here imports torch
or the configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .actions import Program
from .placement import Placement

Generator = Callable[..., tuple[Program, ...]]
"""Placement and micro-batches in (and the record's ``generator_options`` as keywords), one program per rank out."""

Rules = Callable[[Any], None]
"""A schedule's own rules: take the configuration, raise ``ConfigError`` where it breaks one."""


@dataclass(frozen=True)
class Example:
    """A configuration the gallery draws: its title, the options beyond ranks and micro-batches, its caption."""

    title: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    caption: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


@dataclass(frozen=True)
class ScheduleRecord:
    """One schedule: name, generator, the placements it runs on, its options, whether it streams, its own rules.

    ``placements`` are those the generator runs on: ``("contiguous",)`` for
    one stage per rank; with ``"looping"`` it loops ``stages_per_rank``
    stages over the ranks (its family); ``"vshape"`` where it also runs on
    the V-shape, and ``("vshape",)`` alone for a schedule that runs on nothing
    else (two stages a rank; ``auto`` placement means the V for it).  ``options`` are the configuration fields only this
    schedule takes, with the default it fills in (``None``: none);
    ``generator_options`` those of them the generator takes as keywords.
    A schedule that ``streams`` never drains between calls (its generator
    takes every call's micro-batches at once).  ``rules`` run after the
    general rules of ``validate_config``.
    """

    name: str
    generator: Generator
    placements: tuple[str, ...] = ("contiguous", "looping")
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    generator_options: tuple[str, ...] = ()
    streams: bool = False
    splits_backward: bool = False
    """Whether its programs split ``B`` into ``I`` and ``W`` (the cost of a backward is split too)."""
    rules: Rules | None = None
    examples: tuple[Example, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def family(self) -> str:
        """Return the placement family: ``looping`` (``stages_per_rank`` stages a rank) or ``contiguous`` (one).

        A schedule that runs only on the V-shape (two stages a rank) is of the looping family.
        """
        return "contiguous" if self.placements == ("contiguous",) else "looping"

    @property
    def default_placement(self) -> str | None:
        """Return the placement ``auto`` means for this schedule: ``vshape`` when it runs on nothing else, else ``None``."""
        return "vshape" if self.placements == ("vshape",) else None

    @property
    def default_stages_per_rank(self) -> int:
        """Return the stages per rank a configuration gets when it names none: 1 for one stage per rank, else 2."""
        return 2 if self.family == "looping" else 1

    def generate(self, placement: Placement, microbatches: int, config: Any) -> tuple[Program, ...]:
        """Return the compute programs of ``microbatches`` micro-batches, with the options the generator takes."""
        options = {name: getattr(config, name) for name in self.generator_options}
        return self.generator(placement, microbatches, **options)


_RECORDS: dict[str, ScheduleRecord] = {}


def register(record: ScheduleRecord) -> ScheduleRecord:
    """Add ``record`` to the registry (after those already there) and return it; a name is registered once."""
    if record.name in _RECORDS:
        raise ValueError(f"schedule {record.name!r} is registered already")
    _RECORDS[record.name] = record
    return record


def schedule_record(name: object) -> ScheduleRecord | None:
    """Return the record of the schedule ``name``, or ``None`` for a name no schedule has."""
    return _RECORDS.get(name) if isinstance(name, str) else None


def schedule_records() -> tuple[ScheduleRecord, ...]:
    """Return every registered record, in the order of registration."""
    return tuple(_RECORDS.values())


def names_where(test: Callable[[ScheduleRecord], bool]) -> tuple[str, ...]:
    """Return the names of the registered schedules whose record passes ``test``, in the order of registration."""
    return tuple(record.name for record in _RECORDS.values() if test(record))


class ScheduleNames(Sequence[str]):
    """The names of the registered schedules that pass a test, read from the registry at each use.

    A sequence like the tuple it replaces (``in``, iteration, ``join``,
    comparison with a tuple), so that a schedule registered later is
    listed too.
    """

    def __init__(self, test: Callable[[ScheduleRecord], bool] = lambda record: True):
        self._test = test

    def _names(self) -> tuple[str, ...]:
        return names_where(self._test)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        record = schedule_record(name)
        return record is not None and self._test(record)

    def __eq__(self, other: object) -> bool:
        return self._names() == (tuple(other) if isinstance(other, (tuple, list, ScheduleNames)) else other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


class Generators(Mapping[str, Generator]):
    """Each registered schedule's generator by name, read from the registry at each use."""

    def __getitem__(self, name: str) -> Generator:
        return _RECORDS[name].generator

    def __len__(self) -> int:
        return len(_RECORDS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_RECORDS))
