"""What one run of a program holds and produces: the local stages it runs, its tensors, and its result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .p2p import Mailbox
from .sharding import StageShard
from .stage import Stage

COMPUTE, P2P = "compute", "p2p"
"""The streams a handler records its action on (collectives record themselves on the data-parallel stream)."""


class RunResult(NamedTuple):
    """What one run of a program produced on this rank.

    ``loss_sum`` is the sum of the micro-batch losses (last stage only, else
    ``None``); ``outputs`` the last stage's outputs per micro-batch in
    forward-only runs; ``events`` the measured ``(rank, stream, action, start,
    end)`` rows in ``time.perf_counter`` seconds: a receive from when the rank
    waits for it to its arrival, a send while it is being posted (gloo tells
    a send's completion only to a wait, which would block), a collective from
    its issue to its completion; ``exposed_data_parallel`` the seconds the
    rank waited for collectives; ``peak_activation_bytes`` the peak of saved
    activations during the run when a meter is attached; ``buffer_peak`` the
    peak bytes of the stages' parameter and gradient buffers, per kind.
    """

    loss_sum: float | None
    outputs: tuple | None
    events: tuple[tuple, ...]
    exposed_data_parallel: float = 0.0
    peak_activation_bytes: int | None = None
    buffer_peak: dict | None = None
    skipped: int | None = (
        None  # the first stage whose gradients were not finite anywhere, when a GUARD skipped the step
    )
    grad_norm: float | None = None  # the global gradient norm before clipping, when a CLIP ran


@dataclass(frozen=True)
class LocalStage:
    """One stage this rank holds: its layers, their sharded buffers, its optimizer (with its learning-rate
    scheduler, stepped after it) and its recomputation mode."""

    module: Stage
    shard: StageShard
    optimizer: torch.optim.Optimizer | None = None
    recompute: str = "none"
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def parameters(self) -> list[torch.Tensor]:
        """Return the stage's trainable parameters."""
        return self.shard.parameters


@dataclass
class RunState:
    """The tensors of one run of a program, keyed by ``(stage, micro-batch)``, shared by the handlers."""

    mailbox: Mailbox
    metas: tuple
    inputs: Sequence[tuple] | None
    targets: Sequence | None
    training: bool
    stage_inputs: dict = field(default_factory=dict)  # what a forward took, for its backward
    stage_outputs: dict = field(default_factory=dict)  # what a forward produced, until sent or differentiated
    received: dict = field(default_factory=dict)  # activations received for a forward
    output_grads: dict = field(default_factory=dict)  # gradients of a stage's outputs, for its backward
    input_grads: dict = field(default_factory=dict)  # gradients of a stage's inputs, to send back
    held_for_weights: dict = field(default_factory=dict)  # roots kept by I for the W that follows
    recordings: dict = field(default_factory=dict)  # recomputation regions per forward
    losses: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    buffer_peak: dict = field(default_factory=dict)
    skipped: int | None = None  # set by a GUARD that stops the rest of the program
    grad_norm: float | None = None  # set by a CLIP: the global gradient norm before clipping
