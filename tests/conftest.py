import pytest

from layerpipe.schedule.build import build_schedule
from layerpipe.schedule.config import ScheduleConfig


@pytest.fixture
def schedule_of():
    """Build a schedule from keyword arguments of ScheduleConfig."""

    def make(schedule, ranks, microbatches, stages_per_rank=1, **options):
        return build_schedule(ScheduleConfig(schedule, ranks, microbatches, stages_per_rank, **options))

    return make
