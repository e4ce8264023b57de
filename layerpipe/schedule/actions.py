"""Actions: the instructions a pipeline rank executes, and their compact notation.

An action prints as ``<stage><KIND>[<microbatch>]``, the notation of
``torch.distributed.pipelining``: ``2F0`` is stage 2's forward of micro-batch
0, ``1SEND_F4`` sends stage 1's output for micro-batch 4 to the next stage,
``0GATHER`` all-gathers stage 0's sharded weights, ``0REDUCE[2/4]`` issues
portion 2 of 4 of stage 0's gradient reduction, ``0GUARD`` is the rank's
guard before its steps (written with the stage of its first ``STEP``) and
``0CLIP`` its global-norm clip there; ``0TIE`` sums the gradients of the
tie group whose first stage is 0.  An overlapped pair prints as torch
prints it: ``(0F3;3B1)OVERLAP_F_B`` is stage 0's forward of micro-batch 3
beside stage 3's backward of micro-batch 1.  ``parse_action`` reads the
notation back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum
from operator import itemgetter
from typing import NamedTuple

COMPUTE, P2P, DATA_PARALLEL = "compute", "p2p", "data_parallel"
"""The streams of a rank, spelled as the timeline spells them."""

ITS_SEND, EVERY_RANK, TIE_GROUP = "its send", "every rank", "its tie group"
"""What a receive waits for (the matching send), what a guard waits for (every rank to reach its guard) and what a
tie sum waits for (every rank holding a stage of its tie group to reach its own)."""


class KindRow(NamedTuple):
    """One row of the table of action kinds.

    ``stream``: where the action runs (``None``: nowhere, it takes no time);
    ``waits_for``: the kind of its stage's collectives it waits for (``GATHER``, ``REDUCE``), ``ITS_SEND``,
    ``EVERY_RANK`` or ``None``; ``microbatch``: whether it names a micro-batch; ``gradient``: whether it produces
    gradients; ``label`` and ``colour``: how help texts and Gantt charts show it.
    """

    notation: str
    stream: str | None
    waits_for: str | None
    microbatch: bool
    gradient: bool
    label: str
    colour: str


class Kind(str, Enum):
    """What an action does: the one table of action kinds, one ``KindRow`` per kind (``Kind.F.row``).

    The value is the text used in the notation.  The parse pattern, the kind sets, ``AWAITS``, the Gantt chart's
    colours and legend and the command line's list of actions are generated from the rows.
    """

    # forward of one micro-batch through one stage
    F = KindRow("F", COMPUTE, "GATHER", True, False, "forward", "#4C78A8")
    # full backward (input and weight gradients)
    B = KindRow("B", COMPUTE, "GATHER", True, True, "backward", "#F58518")
    # input-gradient half of B (needed by the previous stage)
    I = KindRow("I", COMPUTE, "GATHER", True, True, "input gradient", "#E45756")
    # weight-gradient half of B (can wait)
    W = KindRow("W", COMPUTE, "GATHER", True, True, "weight gradient", "#72B7B2")
    # recompute the stage's forward intermediates before its backward
    R = KindRow("R", COMPUTE, "GATHER", True, False, "recompute", "#B279A2")
    # send this stage's output to the next stage
    SEND_F = KindRow("SEND_F", P2P, None, True, False, "send activation", "#9DB9D8")
    # receive this stage's input from the previous stage
    RECV_F = KindRow("RECV_F", P2P, ITS_SEND, True, False, "wait for activation", "#C9D8EA")
    # send the gradient of this stage's input to the previous stage
    SEND_B = KindRow("SEND_B", P2P, None, True, False, "send gradient", "#F9C08A")
    # receive the gradient of this stage's output from the next stage
    RECV_B = KindRow("RECV_B", P2P, ITS_SEND, True, False, "wait for gradient", "#FCDDBE")
    # all-gather the stage's sharded weights into a full buffer
    GATHER = KindRow("GATHER", DATA_PARALLEL, None, False, False, "gather weights", "#8E6C8A")
    # free the stage's gathered weight buffer (ZeRO-3)
    RELEASE = KindRow("RELEASE", None, "GATHER", False, False, "release weights", "#BAB0AC")
    # reduce the stage's gradients across data-parallel replicas
    REDUCE = KindRow("REDUCE", DATA_PARALLEL, None, False, False, "reduce gradients", "#D62728")
    # optimizer step for the stage
    STEP = KindRow("STEP", COMPUTE, "REDUCE", False, False, "optimizer step", "#54A24B")
    # every process agrees whether to go on; if not, the rest of the step is skipped everywhere
    GUARD = KindRow("GUARD", COMPUTE, EVERY_RANK, False, False, "finiteness guard", "#333333")
    # every process sums its part of the squared gradient norm (one all-reduce, which guards too); then every stage's
    # gradients are scaled down to the clip limit
    CLIP = KindRow("CLIP", COMPUTE, EVERY_RANK, False, False, "clip gradient norm", "#7F3C8D")
    # sum the gradients of the parameters tied across stages over the holders of one tie group (written with the
    # group's first stage; one all-reduce over the holding ranks, a local sum where one rank holds them all)
    TIE = KindRow("TIE", COMPUTE, TIE_GROUP, False, False, "sum tied gradients", "#17BECF")
    # an overlapped pair: one micro-batch's forward beside another's full backward (DualPipeV), one action whose
    # halves (``halves``) the passes and interpreters see; not a backward kind itself: a stage's last backward is
    # always a plain action in the schedules that pair
    OVERLAP_F_B = KindRow("OVERLAP_F_B", COMPUTE, "GATHER", True, False, "overlapped forward and backward", "#A0A0A0")

    # Enum's own __hash__ is Python code; actions are hashed by the million.
    __hash__ = str.__hash__

    def __new__(cls, *fields):
        row = KindRow(*fields)
        member = str.__new__(cls, row.notation)
        member._value_ = row.notation
        member.row = row
        return member

    def __str__(self) -> str:
        return self.value


def _kinds(keep) -> frozenset[Kind]:
    """Return the kinds whose row ``keep`` accepts."""
    return frozenset(kind for kind in Kind if keep(kind.row))


COMPUTE_KINDS = _kinds(lambda row: row.stream == COMPUTE and row.microbatch)
"""Kinds that run the stage's layers and take a micro-batch."""

BACKWARD_KINDS = _kinds(lambda row: row.gradient)
"""Kinds that produce gradients."""

P2P_KINDS = _kinds(lambda row: row.stream == P2P)
"""Point-to-point kinds between pipeline ranks; they take a micro-batch."""

RECEIVE_KINDS = _kinds(lambda row: row.waits_for == ITS_SEND)
"""Kinds that block until the matching send has been issued."""

SEND_KINDS = P2P_KINDS - RECEIVE_KINDS
"""Kinds that hand a message to the next or previous stage; they never block."""

COLLECTIVE_KINDS = _kinds(lambda row: row.stream == DATA_PARALLEL)
"""Kinds that issue a collective over the data-parallel replicas."""

BARRIER_KINDS = _kinds(lambda row: row.waits_for == EVERY_RANK)
"""Kinds that block until every rank has reached one (the guard, the clip)."""

TIE_KINDS = _kinds(lambda row: row.waits_for == TIE_GROUP)
"""Kinds that block until every rank of their tie group has reached one (the tie sum)."""

PAIR = Kind.OVERLAP_F_B
"""The overlapped pair: a forward and a backward in one action (``halves``)."""

TIMED_KINDS = _kinds(lambda row: row.stream == COMPUTE) - BARRIER_KINDS - TIE_KINDS - {PAIR}
"""Kinds that occupy the compute stream for a time of their own (a pair's time is its halves')."""

_MICROBATCH_KINDS = _kinds(lambda row: row.microbatch)

AWAITS: dict[Kind, Kind] = {
    kind: Kind(kind.row.waits_for)
    for kind in Kind
    if kind.row.waits_for in {collective.value for collective in COLLECTIVE_KINDS}
}
"""The wait rules of both interpreters: an action of this kind waits until the collectives of the named kind
issued earlier for its stage have finished (compute and ``RELEASE`` wait for the stage's ``GATHER``, ``STEP`` for
its ``REDUCE`` portions).  Nothing else waits for a collective until the end of the program."""


def kinds_help() -> str:
    """Return every kind with its label, as the command line lists them: ``F forward, B backward, ...``."""
    return ", ".join(f"{kind.value} {kind.row.label}" for kind in Kind)


class Action(NamedTuple):
    """One instruction of a program.

    ``microbatch`` is set exactly for compute and point-to-point kinds.
    ``portion`` and ``portions`` are set only for a reduce split into parts
    (1-based: portion 2 of 4 prints as ``REDUCE[2/4]``).  An overlapped pair
    (``OVERLAP_F_B``, built by ``pair``) keeps its forward half in ``stage``
    and ``microbatch`` and its backward half's stage and micro-batch in
    ``portion`` and ``portions``: every action stays five small fields.
    """

    stage: int
    kind: Kind
    microbatch: int | None = None
    portion: int | None = None
    portions: int | None = None

    def __str__(self) -> str:
        if self.kind is PAIR:
            return f"({self.stage}F{self.microbatch};{self.portion}B{self.portions}){PAIR.value}"
        text = f"{self.stage}{self.kind.value}"
        if self.microbatch is not None:
            text += str(self.microbatch)
        if self.portions is not None:
            text += f"[{self.portion}/{self.portions}]"
        return text

    def __repr__(self) -> str:
        return str(self)


Program = tuple[Action, ...]
"""The ordered actions of one rank for one step."""

_ACTION_PATTERN = re.compile(
    r"(\d+)(" + "|".join(sorted((kind.value for kind in Kind), key=len, reverse=True)) + r")(\d*)(?:\[(\d+)/(\d+)\])?"
)
"""The notation: stage, kind (the longest names first, so that ``RECV_F`` is not read as ``R``), micro-batch, portion."""

_PAIR_PATTERN = re.compile(r"\((\d+)F(\d+);(\d+)B(\d+)\)" + PAIR.value)
"""An overlapped pair as torch prints it: ``(0F3;3B1)OVERLAP_F_B``."""


def pair(forward_stage: int, forward_microbatch: int, backward_stage: int, backward_microbatch: int) -> Action:
    """Return the overlapped pair of ``forward_stage``'s forward and ``backward_stage``'s full backward."""
    return Action(forward_stage, PAIR, forward_microbatch, backward_stage, backward_microbatch)


def halves(action: Action) -> tuple[Action, Action]:
    """Return the forward and the backward half of an overlapped pair, in the order they run by default."""
    stage, _, microbatch, backward_stage, backward_microbatch = action
    return Action(stage, Kind.F, microbatch), Action(backward_stage, Kind.B, backward_microbatch)


_KIND_OF = itemgetter(1)


def expand_pairs(program: Sequence[Action]) -> Program:
    """Return ``program`` with each overlapped pair replaced by its halves (forward, then backward)."""
    if PAIR not in map(_KIND_OF, program):  # the scan in C: programs without pairs are the common case
        return program if isinstance(program, tuple) else tuple(program)
    return tuple(half for action in program for half in (halves(action) if action[1] is PAIR else (action,)))


def parse_action(text: str) -> Action:
    """Return the action written as ``text`` (the inverse of ``str(action)``).

    Refuses, with ``ValueError``, text that is not one action in the notation,
    a micro-batch on a whole-stage kind, a missing micro-batch on a compute or
    point-to-point kind, a portion on anything but ``REDUCE``, and a portion
    outside ``1..portions``.
    """
    match = _PAIR_PATTERN.fullmatch(text.strip())
    if match is not None:
        return pair(*map(int, match.groups()))
    match = _ACTION_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an action: {text!r} (expected e.g. 2F0, 1SEND_F4, 0GATHER, 0REDUCE[2/4])")
    stage, kind_text, microbatch, portion, portions = match.groups()
    kind = Kind(kind_text)
    if kind is PAIR:
        raise ValueError(f"not an action: {text!r} (a pair is written (0F3;3B1){PAIR.value})")
    if kind in _MICROBATCH_KINDS and not microbatch:
        raise ValueError(f"not an action: {text!r} ({kind.value} needs a micro-batch number)")
    if kind not in _MICROBATCH_KINDS and microbatch:
        raise ValueError(f"not an action: {text!r} ({kind.value} takes no micro-batch number)")
    if portions is not None:
        if kind is not Kind.REDUCE:
            raise ValueError(f"not an action: {text!r} (only REDUCE is split into portions)")
        if not 1 <= int(portion) <= int(portions):
            raise ValueError(f"not an action: {text!r} (portion must be between 1 and {portions})")
        return Action(int(stage), kind, None, int(portion), int(portions))
    return Action(int(stage), kind, int(microbatch) if microbatch else None)


def parse_program(text: str) -> Program:
    """Return the program written as whitespace-separated actions."""
    return tuple(parse_action(word) for word in text.split())


def backward_end(program: Sequence[Action]) -> Kind:
    """Return the kind that ends a micro-batch's backward in ``program``: ``W`` when it splits ``B``, else ``B``."""
    return Kind.W if any(action[1] is Kind.W for action in program) else Kind.B


def format_program(program: Sequence[Action]) -> str:
    """Return the program as space-separated actions, e.g. ``0F0 0F1 0B0``."""
    return " ".join(map(str, program))


class Message(NamedTuple):
    """One point-to-point message: the stage that sends it, its direction and its micro-batch.

    A forward message carries stage ``sender``'s output to stage
    ``sender + 1``; a backward message carries the gradient of stage
    ``sender - 1``'s output from stage ``sender`` back to it.
    """

    sender: int
    backward: bool
    microbatch: int

    @property
    def receiver(self) -> int:
        """Return the stage the message goes to."""
        return self.sender - 1 if self.backward else self.sender + 1

    def number(self, microbatches: int) -> int:
        """Return a small integer naming the message uniquely among those of ``microbatches`` consecutive ones (``0 ≤ n < 2·stages·m``).

        Micro-batch numbers count modulo ``microbatches``, so an async
        stream's numbers, which grow from call to call, reuse the numbers.
        """
        return (self.sender * 2 + self.backward) * microbatches + self.microbatch % microbatches

    def send(self) -> Action:
        """Return the send action of the message."""
        return Action(self.sender, Kind.SEND_B if self.backward else Kind.SEND_F, self.microbatch)

    def receive(self) -> Action:
        """Return the receive action of the message."""
        return Action(self.receiver, Kind.RECV_B if self.backward else Kind.RECV_F, self.microbatch)

    def describe(self) -> str:
        """Return what the message carries, in words."""
        if self.backward:
            return (
                f"the gradient of stage {self.receiver}'s output for micro-batch {self.microbatch} "
                f"(from stage {self.sender})"
            )
        return f"stage {self.sender}'s output for micro-batch {self.microbatch}"


_MESSAGE_SHAPE = {Kind.SEND_F: (0, False), Kind.SEND_B: (0, True), Kind.RECV_F: (-1, False), Kind.RECV_B: (1, True)}
"""Per transfer kind: the sending stage's offset from the action's stage, and whether the message goes backward."""


def message_of(action: Action) -> Message:
    """Return the message a ``SEND_*`` delivers or a ``RECV_*`` waits for.

    The one place that matches a send to its receive: validation, the
    simulator and the runtime all ask it.  Refuses other kinds with ``ValueError``.
    """
    shape = _MESSAGE_SHAPE.get(action[1])
    if shape is None:
        raise ValueError(f"{action} is not a send or a receive")
    return tuple.__new__(
        Message, (action[0] + shape[0], shape[1], action[2])
    )  # Message(...) without its keyword handling: this is hot


def peer_stage(action: Action) -> int:
    """Return the stage on the other side of a send or receive."""
    message = message_of(action)
    return message.receiver if action[1] is Kind.SEND_F or action[1] is Kind.SEND_B else message.sender
