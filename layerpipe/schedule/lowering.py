"""Lowering passes: each takes the programs of all ranks and returns new programs.

The passes, in the order ``lower`` applies them:

* ``add_weight_gathers`` — ZeRO-3: ``GATHER`` a stage's sharded weights before
  it is used (prefetched one run of actions ahead) and ``RELEASE`` them after;
* ``add_gradient_reduces`` — ``REDUCE`` a stage's gradients right after its
  last backward, optionally in portions issued in a fixed priority order, or
  every stage's after the rank's last backward (Megatron-LM's order);
* ``add_optimizer_steps`` — ``STEP`` every stage at the end, or each early,
  after the next stage's reduce (ZeRO-1/2 then all-gather the updated
  weight shards with ``GATHER``);
* ``add_periodic_updates`` — instead of the two above, for the async
  schedule: ``REDUCE`` and ``STEP`` a stage after every ``k`` of its backwards;
* ``add_guard`` — a ``GUARD`` before each rank's first ``STEP``: every process
  agrees whether the step goes on (``skip_nonfinite``); or a ``CLIP`` there,
  whose one all-reduce of the squared gradient norm guards too (``clip_grad_norm``);
* ``add_p2p`` — ``SEND``/``RECV`` pairs for every activation and gradient that
  crosses ranks;
* ``add_recompute`` — ``R`` right before the backward of recomputed stages.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from .actions import BACKWARD_KINDS, COMPUTE_KINDS, PAIR, Action, Kind, Program, backward_end, halves
from .placement import Placement

F, B, I, W, R = Kind.F, Kind.B, Kind.I, Kind.W, Kind.R


def add_p2p(programs: Sequence[Program], placement: Placement) -> tuple[Program, ...]:
    """Return programs with a ``SEND`` after every producer and a ``RECV`` before every consumer that cross ranks.

    ``sSEND_Fi`` follows ``sFi`` when stage ``s+1`` lives elsewhere, and
    ``(s+1)RECV_Fi`` precedes ``(s+1)Fi``.  Likewise ``sSEND_Bi`` follows the
    ``B`` (or ``I``) of stage ``s`` when stage ``s-1`` lives elsewhere and
    ``(s-1)RECV_Bi`` precedes the backward of ``s-1``.  An overlapped pair
    receives what both of its halves need before it and sends what both
    produce after it (``_pair_p2p``).
    """
    sends_forward, receives_forward = placement.sends_forward, placement.receives_forward
    new = tuple.__new__  # builds Actions without the keyword handling of Action(...): this pass is hot
    send_f, recv_f, send_b, recv_b = Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B
    lowered = []
    for program in programs:
        out: list[Action] = []
        append = out.append
        for action in program:
            stage, kind, mb, _, _ = action
            if kind is F:
                if receives_forward[stage]:
                    append(new(Action, (stage, recv_f, mb, None, None)))
                append(action)
                if sends_forward[stage]:
                    append(new(Action, (stage, send_f, mb, None, None)))
            elif kind is B or kind is I:
                if sends_forward[stage]:
                    append(new(Action, (stage, recv_b, mb, None, None)))
                append(action)
                if receives_forward[stage]:
                    append(new(Action, (stage, send_b, mb, None, None)))
            elif kind is PAIR:
                out += _pair_p2p(action, placement)
            else:
                append(action)
        lowered.append(tuple(out))
    return tuple(lowered)


def _pair_p2p(action: Action, placement: Placement) -> list[Action]:
    """Return an overlapped pair between the receives its halves need and the sends they make."""
    forward, backward = halves(action)
    before, after = [], []
    if placement.receives_forward[forward.stage]:
        before.append(Action(forward.stage, Kind.RECV_F, forward.microbatch))
    if placement.sends_forward[forward.stage]:
        after.append(Action(forward.stage, Kind.SEND_F, forward.microbatch))
    if placement.sends_forward[backward.stage]:
        before.append(Action(backward.stage, Kind.RECV_B, backward.microbatch))
    if placement.receives_forward[backward.stage]:
        after.append(Action(backward.stage, Kind.SEND_B, backward.microbatch))
    return before + [action] + after


def add_recompute(programs: Sequence[Program], stages: Iterable[int]) -> tuple[Program, ...]:
    """Return programs with ``sRi`` right before the backward (``B`` or ``I``) of every recomputed stage ``s``.

    Run after ``add_p2p`` so that the recompute follows the receipt of the
    output gradient: it happens after the loss gradient, never during forward.
    An overlapped pair whose backward half is recomputed follows that ``R``.
    """
    recomputed = frozenset(stages)
    lowered = []
    for program in programs:
        out: list[Action] = []
        for action in program:
            if (action.kind is B or action.kind is I) and action.stage in recomputed:
                out.append(Action(action.stage, R, action.microbatch))
            elif action.kind is PAIR and action.portion in recomputed:
                out.append(Action(action.portion, R, action.portions))
            out.append(action)
        lowered.append(tuple(out))
    return tuple(lowered)


def _runs(program: Program) -> list[tuple[int, int, int]]:
    """Return the maximal runs of consecutive compute actions on one stage as (stage, first, last) indices."""
    runs: list[tuple[int, int, int]] = []
    for index, action in enumerate(program):
        if action.kind not in COMPUTE_KINDS:
            continue
        if runs and runs[-1][0] == action.stage:
            runs[-1] = (action.stage, runs[-1][1], index)
        else:
            runs.append((action.stage, index, index))
    return runs


def _gather_plan(
    runs: list[tuple[int, int, int]], buffers: int
) -> tuple[dict[int, list[Action]], dict[int, list[Action]]]:
    """Decide where GATHER and RELEASE go for one rank: (actions before index, actions after index).

    A stage is gathered when a run needs it and it is not held; when
    ``buffers`` are full, the held stage used farthest in the future is
    released after its last use so far (Belady's rule; the stage of the
    previous run is kept if any other can go, so that the gather overlaps that
    run).  A gather is issued at the start of the previous run when a buffer
    is free then, else right after the release that frees one.
    """
    before: dict[int, list[Action]] = {}
    after: dict[int, list[Action]] = {}
    held: dict[int, int] = {}  # stage -> index of its last use so far
    free_since = [-1] * buffers  # per free buffer: the program index after which it is free, earliest first
    uses: dict[int, list[int]] = {}
    for position, (stage, _, _) in enumerate(runs):
        uses.setdefault(stage, []).append(position)

    def next_use(candidate: int, position: int) -> float:
        later = bisect.bisect_left(uses[candidate], position)
        return uses[candidate][later] if later < len(uses[candidate]) else float("inf")

    for position, (stage, first, last) in enumerate(runs):
        if stage not in held:
            previous_stage = runs[position - 1][0] if position else None
            if not free_since:
                candidates = [s for s in held if s != previous_stage] or list(held)
                victim = max(candidates, key=lambda s: (next_use(s, position), s))
                after.setdefault(held[victim], []).append(Action(victim, Kind.RELEASE))
                free_since.append(held.pop(victim))
            freed_at = free_since.pop(0)
            previous_first = runs[position - 1][1] if position else first
            if freed_at < previous_first:
                before.setdefault(previous_first, []).append(Action(stage, Kind.GATHER))
            else:
                after.setdefault(freed_at, []).append(Action(stage, Kind.GATHER))
        held[stage] = last
    for stage, last in held.items():
        after.setdefault(last, []).append(Action(stage, Kind.RELEASE))
    return before, after


def add_weight_gathers(programs: Sequence[Program], weight_buffers: int | None = None) -> tuple[Program, ...]:
    """Return ZeRO-3 programs: ``GATHER`` each stage before use, ``RELEASE`` it after.

    ``weight_buffers`` bounds the gathered stages a rank holds at once
    (``None``: all of its stages, so each is gathered exactly once per step and
    released after its last use).  With fewer buffers, gathers repeat where
    the order switches between stages: once per group for depth-first
    orders, but still a constant number per step for breadth-first.
    """
    lowered = []
    for program in programs:
        runs = _runs(program)
        buffers = weight_buffers if weight_buffers is not None else len({stage for stage, _, _ in runs}) or 1
        before, after = _gather_plan(runs, buffers)
        out: list[Action] = []
        for index, action in enumerate(program):
            out += before.get(index, ())
            out.append(action)
            out += after.get(index, ())
        lowered.append(tuple(out))
    return tuple(lowered)


def add_gradient_reduces(
    programs: Sequence[Program], portions: int = 1, order: str = "priority"
) -> tuple[Program, ...]:
    """Return programs with each stage's ``REDUCE`` right after its last backward action (``order`` priority or
    bucketed), or every stage's after the rank's last backward (``after-flush``).

    With ``portions > 1`` the reduce is split.  Prioritised (the default):
    when a stage finishes its backward, its first portion is issued at once,
    followed by the held-back remaining portions of the stage that finished
    before it; the stage's own remaining portions wait until the next stage
    finishes.  The rank's last stage to finish (its earliest layers) issues
    all of its portions before the held-back rest.  So the first portion of
    stage ``s+1`` travels while ``s`` computes its backward, then ``s`` goes
    out ahead of the rest of ``s+1``, and the earliest layers — the first
    the next step's forward needs — are complete first: one order that every
    replica derives from the program alone.  Bucketed: all portions of a
    stage are issued together when it finishes, in finishing order, as
    fixed-size buckets are in PyTorch's DDP.  After-flush: nothing is reduced
    until the rank's backward is over, then every stage in finishing order,
    as Megatron-LM does without ``--overlap-grad-reduce`` (its gradient
    all-reduce follows the pipeline's forward-backward pass).
    """
    if order == "after-flush":
        return tuple(_reduces_after_flush(program, portions) for program in programs)
    if order not in ("priority", "bucketed"):
        raise ValueError(f"unknown reduce order {order!r}: priority, bucketed or after-flush")
    prioritised = order == "priority"
    lowered = []
    for program in programs:
        last_backward = {action.stage: index for index, action in enumerate(program) if action.kind in BACKWARD_KINDS}
        finishing = {index: stage for stage, index in last_backward.items()}
        final = max(finishing, default=None)
        out: list[Action] = []
        held_back: list[Action] = []
        for index, action in enumerate(program):
            out.append(action)
            stage = finishing.get(index)
            if stage is None:
                continue
            own = _reduce_actions(stage, portions)
            if portions == 1 or not prioritised or index == final:
                out += own + held_back
                held_back = []
            else:
                out += own[:1] + held_back
                held_back = own[1:]
        out += held_back
        lowered.append(tuple(out))
    return tuple(lowered)


def _reduce_actions(stage: int, portions: int) -> list[Action]:
    """Return the ``REDUCE`` of ``stage``: one whole, or its ``portions`` in order."""
    if portions == 1:
        return [Action(stage, Kind.REDUCE)]
    return [Action(stage, Kind.REDUCE, None, k, portions) for k in range(1, portions + 1)]


def _reduces_after_flush(program: Program, portions: int) -> Program:
    """Return ``program`` with every stage's reduce, in finishing order, right after the program's last backward
    action."""
    finishing = _last_backwards(program)
    if not finishing:
        return tuple(program)
    last = finishing[-1][0]
    reduces = [action for _, stage in finishing for action in _reduce_actions(stage, portions)]
    return tuple(program[: last + 1]) + tuple(reduces) + tuple(program[last + 1 :])


def add_optimizer_steps(programs: Sequence[Program], zero: int = 0, early: bool = False) -> tuple[Program, ...]:
    """Return programs with a ``STEP`` of each local stage (ZeRO-1/2: then a ``GATHER`` of the updated shards).

    By default every step comes at the end, lowest stage first.  With
    ``early`` each stage's step follows the point where the next stage the
    rank finishes has finished its backward and issued its reduces: its own
    reduce had that stage's backward to travel, and the update runs while
    the rank's earlier stages still compute.  The rank's last stage to
    finish steps at the end.
    """
    lowered = []
    for program in programs:
        stages = sorted({action.stage for action in program if action.kind in COMPUTE_KINDS})
        if not early:
            lowered.append(tuple(program) + tuple(a for stage in stages for a in _step(stage, zero)))
            continue
        finishing = _finishing_order(program)
        after = {
            _end_of_reduces(program, index): finishing[position - 1]
            for position, (index, _) in enumerate(_last_backwards(program))
            if position
        }
        out: list[Action] = []
        for index, action in enumerate(program):
            out.append(action)
            if index in after:
                out += _step(after[index], zero)
        lowered.append(tuple(out) + (tuple(_step(finishing[-1], zero)) if finishing else ()))
    return tuple(lowered)


def _step(stage: int, zero: int) -> list[Action]:
    return [Action(stage, Kind.STEP)] + ([Action(stage, Kind.GATHER)] if zero in (1, 2) else [])


def _last_backwards(program: Program) -> list[tuple[int, int]]:
    """Return ``(index, stage)`` of each stage's last backward action, in program order."""
    last = {action.stage: index for index, action in enumerate(program) if action.kind in BACKWARD_KINDS}
    return sorted((index, stage) for stage, index in last.items())


def _finishing_order(program: Program) -> list[int]:
    return [stage for _, stage in _last_backwards(program)]


def _end_of_reduces(program: Program, index: int) -> int:
    """Return the index of the last ``REDUCE`` in the run right after ``index`` (``index`` itself when none)."""
    while index + 1 < len(program) and program[index + 1].kind is Kind.REDUCE:
        index += 1
    return index


def add_periodic_updates(
    programs: Sequence[Program], every: int, zero: int = 0, data_parallel: int = 1
) -> tuple[Program, ...]:
    """Return programs where each stage updates after every ``every`` of its backwards (pipelined backpropagation).

    After the backward (``B``, or ``W`` when split) of sub-minibatch ``j``
    with ``(j + 1) % every == 0`` — the ``every``-th, ``2·every``-th, ...
    of a stream that starts at a multiple of ``every`` — come the stage's
    ``REDUCE`` (with data parallelism), its ``STEP`` and, at ZeRO-1, the
    ``GATHER`` of the updated shards.  Each stage updates on its own:
    nothing waits for the other stages.  Numbering by sub-minibatch keeps
    the updates in place in a slice of a stream (``stream_slice``).
    """
    lowered = []
    for program in programs:
        freeing = backward_end(program)
        out: list[Action] = []
        for action in program:
            out.append(action)
            if action.kind is freeing and (action.microbatch + 1) % every == 0:
                out += _update(action.stage, zero, data_parallel)
        lowered.append(tuple(out))
    return tuple(lowered)


def add_guard(programs: Sequence[Program], kind: Kind = Kind.GUARD) -> tuple[Program, ...]:
    """Return programs with a ``GUARD`` (or another barrier ``kind``: ``CLIP``) right before each rank's first
    ``STEP``, written with that step's stage.

    The guard is one agreement of every process: when it fails (a gradient
    that is not finite anywhere), every rank skips the rest of its program —
    the steps and what follows them — so no rank waits for a peer that
    skipped.  Refuses programs with actions other than ``STEP`` and
    ``GATHER`` after the first ``STEP`` (``ValueError``): skipping them
    could leave a peer waiting.
    """
    lowered = []
    for program in programs:
        first = next((index for index, action in enumerate(program) if action.kind is Kind.STEP), None)
        if first is None:
            lowered.append(tuple(program))
            continue
        after = [action for action in program[first:] if action.kind not in (Kind.STEP, Kind.GATHER)]
        if after:
            raise ValueError(f"{after[0]} follows the first STEP: a guard there could skip it on one rank only")
        lowered.append(tuple(program[:first]) + (Action(program[first].stage, kind),) + tuple(program[first:]))
    return tuple(lowered)


def _update(stage: int, zero: int, data_parallel: int) -> list[Action]:
    """Return the actions of one weight update of ``stage``: reduce, step, and gather the shards at ZeRO-1/2."""
    return ([Action(stage, Kind.REDUCE)] if data_parallel > 1 else []) + _step(stage, zero)
