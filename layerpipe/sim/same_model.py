"""Cost translation: the costs of one model's stages for a schedule that cuts the same model into fewer stages.

``layerpipe compare`` runs schedules with different numbers of stages per
rank on one model.  Its cost options describe one stage of a rank holding
the looping schedules' ``stages_per_rank`` stages; gpipe and 1f1b hold one
stage per rank, so each of their stages holds several of those.
"""

from __future__ import annotations

import dataclasses

from ..knobs import ConfigError
from .cost import CostModel

PER_STAGE = ("forward_time", "backward_time", "recompute_time", "boundary_bytes", "activation_bytes", "weight_bytes")
"""The costs that may be given one per stage."""


def same_model_cost(cost: CostModel, reference_stages: int, stages_per_rank: int) -> CostModel:
    """Return ``cost``, given for ranks of ``reference_stages`` stages, for ranks of ``stages_per_rank`` stages.

    A stage of a rank holding fewer stages holds more layers: its times,
    activations and weights scale by ``reference_stages / stages_per_rank``,
    its boundary stays.  One value per stage cannot be translated: refused
    with ``ConfigError``.
    """
    scale = reference_stages / stages_per_rank
    if scale == 1:
        return cost
    for name in PER_STAGE:
        value = getattr(cost, name)
        if isinstance(value, (tuple, list)):
            raise ConfigError(
                name,
                value,
                "compare runs schedules with different numbers of stages: give one value "
                "(one per stage works with simulate)",
            )
    recompute = None if cost.recompute_time is None else cost.recompute_time * scale
    return dataclasses.replace(
        cost,
        forward_time=cost.forward_time * scale,
        backward_time=cost.backward_time * scale,
        recompute_time=recompute,
        activation_bytes=cost.activation_bytes * scale,
        weight_bytes=cost.weight_bytes * scale,
    )
