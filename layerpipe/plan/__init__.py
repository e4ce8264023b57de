"""The planner: search pipeline configurations for a GPT on many GPUs by simulating them.

``plan(request)`` enumerates pipeline size ``p`` and data-parallel size
``d = gpus / p``, the micro-batch size and count, the schedule with its
stages per rank and group size, the ZeRO level, recomputation and reduce
portions; it turns each into a cost model (``sim.gpt_costs`` on
``sim.hardware``), refuses what does not fit in memory (``sim.memory``, the
rules the runtime follows) and simulates the rest (``sim.simulator``).

The search is branch and bound: every candidate's busiest rank computes
for a time that no schedule can beat (its ideal time), so candidates are
simulated from the lowest ideal time up, and the search stops once the next
ideal time is slower than the best few simulated steps.  Schedules and
simulations are cached.  Nothing here imports torch.

Layout assumed on a cluster: the ``d`` replicas of a stage are neighbours
(their collectives stay inside a node when ``d`` fits in one), and pipeline
ranks are ``d`` devices apart (their messages cross nodes once ``p·d``
exceeds a node).

The modules: ``request`` (what is asked, the named models, the hardware),
``candidates`` (the configurations tried), ``costs`` (a candidate's cost
model and ideal time), ``memory`` (its memory per device), ``measure`` (one
candidate simulated), ``choice`` (what is kept and recommended), ``pool``
(candidates measured side by side), ``search`` (``plan`` and
``best_among``) and ``report`` (the table and the train TOML file).
"""

from .candidates import Candidate, candidates
from .choice import NEAR_TIE, simplest_first
from .costs import Costs, cached_costs, costs_of, ideal_time
from .measure import PlanEntry, evaluate, measure
from .memory import memory_floor, memory_programs, peak_memory
from .report import describe, table, train_toml
from .request import GIB, MODELS, USABLE_MEMORY, PlanRequest, describe_shape, hardware_of, model_shape
from .search import PlanResult, best_among, plan

__all__ = [
    "GIB",
    "MODELS",
    "NEAR_TIE",
    "USABLE_MEMORY",
    "Candidate",
    "Costs",
    "PlanEntry",
    "PlanRequest",
    "PlanResult",
    "best_among",
    "cached_costs",
    "candidates",
    "costs_of",
    "describe",
    "describe_shape",
    "evaluate",
    "hardware_of",
    "ideal_time",
    "measure",
    "memory_floor",
    "memory_programs",
    "model_shape",
    "peak_memory",
    "plan",
    "simplest_first",
    "table",
    "train_toml",
]
