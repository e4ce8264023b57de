"""The schedule registry: a schedule registered once is listed, accepted, refused by its own rules and built.

A tiny schedule (GPipe with its backwards in reverse order) is registered
here, in the test only, and nothing else is touched: it must appear in
``SCHEDULES``, in the command line's choices and ``compare``, and build,
validate and simulate like the built-in ones.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerpipe.cli import main
from layerpipe.schedule import registry
from layerpipe.schedule.actions import Action, Kind, Program
from layerpipe.schedule.build import build_schedule, stream_programs
from layerpipe.schedule.config import (
    ONE_STAGE_SCHEDULES,
    SCHEDULES,
    SPLITTING_SCHEDULES,
    ConfigError,
    ScheduleConfig,
    validate_config,
)
from layerpipe.schedule.generators import GENERATORS
from layerpipe.schedule.placement import Placement
from layerpipe.schedule.registry import Example, ScheduleRecord, register, schedule_record, schedule_records
from layerpipe.sim.simulator import simulate

BUILT_IN = (
    "gpipe",
    "1f1b",
    "interleaved",
    "breadth-first",
    "grouped",
    "zero-bubble",
    "async",
    "zb-v",
    "v-half",
    "v-min",
    "dualpipe-v",
)


def backwards_reversed(placement: Placement, microbatches: int) -> tuple[Program, ...]:
    """Return GPipe's forwards, then the backwards from the last micro-batch to the first."""
    programs = []
    for rank in range(placement.ranks):
        (stage,) = placement.stages_of(rank)
        forwards = [Action(stage, Kind.F, mb) for mb in range(microbatches)]
        backwards = [Action(stage, Kind.B, mb) for mb in reversed(range(microbatches))]
        programs.append(tuple(forwards + backwards))
    return tuple(programs)


def _at_least_two(config) -> None:
    if config.microbatches < 2:
        raise ConfigError("microbatches", config.microbatches, "backwards-reversed needs at least 2")


TINY = ScheduleRecord(
    "backwards-reversed",
    backwards_reversed,
    ("contiguous",),
    rules=_at_least_two,
    examples=(Example("backwards-reversed", {}, "GPipe with its backwards in reverse order."),),
)


@pytest.fixture
def tiny(monkeypatch):
    """Register the tiny schedule for one test; the registry is as before afterwards."""
    monkeypatch.setattr(registry, "_RECORDS", dict(registry._RECORDS))
    return register(TINY)


def test_the_built_in_schedules_are_registered_in_order():
    assert tuple(SCHEDULES) == SCHEDULES == BUILT_IN
    assert ONE_STAGE_SCHEDULES == ("gpipe", "1f1b", "async") and SPLITTING_SCHEDULES == (
        "zero-bubble",
        "zb-v",
        "v-half",
        "v-min",
        "dualpipe-v",
    )
    assert set(GENERATORS) == set(BUILT_IN) and GENERATORS["gpipe"] is schedule_record("gpipe").generator
    assert [record.name for record in schedule_records() if record.streams] == ["async"]


def test_a_registered_schedule_is_listed_accepted_and_built(tiny, capsys):
    assert "backwards-reversed" in SCHEDULES and SCHEDULES[-1] == "backwards-reversed"
    assert "backwards-reversed" in ONE_STAGE_SCHEDULES and "backwards-reversed" in GENERATORS
    config = validate_config(ScheduleConfig("backwards-reversed", ranks=3, microbatches=4))
    assert config.stages_per_rank == 1 and not config.streams
    schedule = build_schedule(config)  # validated
    assert schedule.compute == backwards_reversed(schedule.placement, 4)
    assert simulate(schedule).step_time > 0
    assert main(["schedule", "--schedule", "backwards-reversed", "-p", "2", "-m", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["rank 0: 0F0 0F1 0B1 0B0", "rank 1: 1F0 1F1 1B1 1B0"]
    assert main(["compare", "-p", "2", "-m", "4", "--json"]) == 0
    assert "backwards-reversed" in [row["config"]["schedule"] for row in json.loads(capsys.readouterr().out)]


def test_a_registered_schedule_has_its_own_rules_and_the_general_ones(tiny):
    with pytest.raises(ConfigError, match="microbatches=1: backwards-reversed needs at least 2"):
        validate_config(ScheduleConfig("backwards-reversed", ranks=2, microbatches=1))
    with pytest.raises(ConfigError, match=r"stages_per_rank=2: backwards-reversed places one stage per rank"):
        validate_config(ScheduleConfig("backwards-reversed", ranks=2, microbatches=2, stages_per_rank=2))
    with pytest.raises(ConfigError, match="update_every=2: only the async schedule takes it"):
        validate_config(ScheduleConfig("backwards-reversed", ranks=2, microbatches=2, update_every=2))
    with pytest.raises(ConfigError, match="only the async schedule runs as a stream"):
        stream_programs(build_schedule(ScheduleConfig("backwards-reversed", ranks=2, microbatches=2)), 0, 0, 2, True)


def test_a_name_is_registered_once(tiny):
    with pytest.raises(ValueError, match="'backwards-reversed' is registered already"):
        register(TINY)


def test_a_schedule_registered_on_import_is_in_the_help():
    script = (
        "from layerpipe.schedule.generators import gpipe\n"
        "from layerpipe.schedule.registry import ScheduleRecord, register\n"
        "register(ScheduleRecord('backwards-reversed', gpipe, ('contiguous',)))\n"
        "from layerpipe.cli import main\n"
        "main(['simulate', '--help'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "async,zb-v,v-half,v-min,dualpipe-v,backwards-reversed" in "".join(done.stdout.split()), (
        done.stderr
    )  # wrapped lines joined


@pytest.mark.parametrize("record", schedule_records(), ids=lambda record: record.name)
def test_every_gallery_example_builds_and_validates(record):
    assert record.examples, f"{record.name} has no gallery example"
    for example in record.examples:
        options = {"schedule": record.name, "ranks": 4, "microbatches": 8, **example.options}
        assert simulate(build_schedule(ScheduleConfig(**options))).step_time > 0
