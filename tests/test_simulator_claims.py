"""The simulator reproduces the qualitative claim of the breadth-first paper (Lamy-Poirier, MLSys 2023).

With fully sharded data parallelism on a slow network and a small batch per
GPU, breadth-first beats depth-first (each stage's reduce hides behind the
backward of earlier stages instead of queuing at the end), and the gap
closes as the number of micro-batches grows.  The setting is
``layerpipe.sim.scenarios.paper_52b``, which ``benchmarks/breadth_first_at_scale.py`` also runs.
"""

from __future__ import annotations

from layerpipe.schedule.build import build_schedule
from layerpipe.sim.scenarios import paper_52b_configurations as configurations
from layerpipe.sim.scenarios import paper_52b_costs as layer_costs
from layerpipe.sim.simulator import simulate


def utilisation(microbatches: int, name: str) -> float:
    result = simulate(build_schedule(configurations(microbatches)[name], check=False), layer_costs())
    return result.ideal_time / result.step_time


def test_breadth_first_beats_depth_first_at_small_batch_and_the_gap_closes_as_m_grows():
    small = utilisation(16, "breadth-first") - utilisation(16, "depth-first, weights resident")
    large = utilisation(256, "breadth-first") - utilisation(256, "depth-first, weights resident")
    assert small > 0.05, f"at m = 16 breadth-first should be clearly ahead ({small:.3f})"
    assert 0 <= large < small / 3, f"the gap should close as m grows ({small:.3f} at m = 16, {large:.3f} at m = 256)"
