"""Property-based: every generated program validates, lowers and simulates without deadlock."""

from hypothesis import given, settings
from hypothesis import strategies as st

from layerpipe.knobs import COMMAND_LINE
from layerpipe.schedule.actions import COMPUTE_KINDS
from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import SCHEDULES, ConfigError, ScheduleConfig
from layerpipe.schedule.registry import schedule_record
from layerpipe.schedule.validation import validate
from layerpipe.sim.cost import CostModel
from layerpipe.sim.simulator import simulate


@st.composite
def configs(draw):
    name = draw(st.sampled_from(tuple(SCHEDULES)))
    record = schedule_record(name)
    if record.streams:
        return _stream_config(draw, name)
    ranks = draw(st.integers(1, 6))
    stages_per_rank = 1 if record.family == "contiguous" else draw(st.integers(1, 4))
    if record.default_placement == "vshape":
        stages_per_rank = 2  # a V holds two stages per rank
    microbatches = draw(st.integers(1, 20))
    group_size = None
    if "group_size" in record.options:
        microbatches = max(microbatches, ranks)
        group_size = draw(st.integers(ranks, microbatches))
    if name == "dualpipe-v":
        microbatches = max(microbatches, 2 * ranks)  # torch's least: as many micro-batches as stages
    if name in ("interleaved", "zero-bubble"):
        rounds = max(1, microbatches // ranks)
        microbatches -= microbatches % rounds
    data_parallel = draw(st.sampled_from([1, 2]))
    zero = draw(st.integers(0, 3)) if data_parallel > 1 else 0
    stages = ranks * stages_per_rank
    modes = draw(st.lists(st.sampled_from(["none", "full", "selective"]), min_size=stages - 1, max_size=stages - 1))
    return ScheduleConfig(
        name,
        ranks,
        microbatches,
        stages_per_rank,
        group_size,
        data_parallel=data_parallel,
        zero=zero,
        reduce_portions=draw(st.integers(1, 3)) if data_parallel > 1 else 1,
        weight_buffers=draw(st.none() | st.integers(2 if name == "dualpipe-v" else 1, 3)) if zero == 3 else None,
        recompute=tuple(modes) + ("none",),
    )


def _stream_config(draw, name: str) -> ScheduleConfig:
    every = draw(st.integers(1, 3))
    data_parallel = draw(st.sampled_from([1, 2]))
    return ScheduleConfig(
        name,
        draw(st.integers(1, 6)),
        every * draw(st.integers(1, 8)),
        update_every=every,
        data_parallel=data_parallel,
        zero=draw(st.integers(0, 1)) if data_parallel > 1 else 0,
    )


@settings(max_examples=300, deadline=None)
@given(configs(), st.floats(0.1, 3.0), st.floats(0.0, 1.0))
def test_generated_programs_validate_lower_and_simulate(config, backward_time, p2p_latency):
    schedule = build_schedule(config)  # validates the lowered programs
    validate(schedule.compute, schedule.placement, config.microbatches)
    result = simulate(schedule, CostModel(backward_time=backward_time, p2p_latency=p2p_latency, weight_bytes=1.0))
    compute_events = sum(1 for event in result.timeline.events if event[1] == "compute")
    assert compute_events == sum(
        1 for p in schedule.programs for a in p if a.kind in COMPUTE_KINDS or a.kind.value == "STEP"
    )
    assert 0 <= result.bubble_fraction < 1
    assert result.step_time >= result.ideal_time


@settings(max_examples=100, deadline=None)
@given(st.integers(-2, 10), st.integers(-2, 10), st.integers(-2, 12))
def test_bad_sizes_are_refused_with_a_config_error(ranks, microbatches, group_size):
    config = ScheduleConfig("grouped", ranks, microbatches, 2, group_size)
    try:
        build_schedule(config)
    except ConfigError as error:
        assert error.field in ("ranks", "microbatches", "group_size")
        assert error.render(COMMAND_LINE).startswith(f"--{error.field.replace('_', '-')} ")
    else:
        assert 1 <= ranks <= group_size <= microbatches
