"""Point-to-point transfers of one rank's program: non-blocking sends, receives posted ahead.

A message is identified by the stage that sends it, its direction and its
micro-batch. Each peer's messages to this rank are known in the order the peer
sends them (every rank holds every program), so receives are posted in that
order: on gloo up to ``lookahead`` messages ahead of the ``RECV`` that needs
them, so transfers overlap compute; on NCCL exactly at the ``RECV``, because
NCCL runs a pair's operations in issue order and an early receive would hold
back this rank's sends to the same peer. On gloo a posted receive holds back
the sends on its pair too, by milliseconds while the sender computes, so
messages to a lower rank go on a group of their own
(``RankContext.group_of``): each pair of each group carries the program's
messages one way only (the shape agreement of the first step still goes both
ways on the default group). Sends never block: they are waited for when the
program ends. Every wait has a timeout whose error names the rank, the action
and the peer.

A step given as a list of micro-batches (``microbatch_lists``), whose
shapes may differ, agrees no shapes: every message announces its own, a
header of its tensors' shapes and dtypes (``stage.encode_header``) in the
slot before them.  The header's receive is posted ahead, as a message's
tensors are for one shape; the tensors' receives are posted as soon as this
rank sees it arrived (``poll``: at each send and receive), else at the
``RECV``.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..schedule.actions import Action, Kind, Message, Program, message_of, peer_stage
from .context import RankContext
from .stage import (
    HEADER_LENGTH,
    ListedMetas,
    PipelineError,
    TensorMeta,
    carries_gradient,
    decode_header,
    encode_header,
    metas_of,
    stage_metas,
)
from .tags import TENSOR_SLOTS, message_tag

HEADER_META = TensorMeta((HEADER_LENGTH,), torch.int64)
"""What a message of a list of micro-batches sends first: the shapes and dtypes of its tensors."""


def failure_reason(error: BaseException) -> str:
    """Return the last line of a communication error (gloo puts the cause there)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


class _WaitReporter:
    """A background thread that says, every ``interval`` seconds, what this process has been waiting for so long.

    ``wait_for`` registers its wait (two assignments, nothing on the hot
    path) and clears it when done; a wait longer than ``interval`` gets a
    line on stderr: ``rank 0 still waiting at 0RECV_B4 ... from rank 1, 60 s of 300``.
    """

    def __init__(self, interval: float):
        self.interval = interval
        self.current: tuple[int, str, float, float] | None = None  # rank, what, started, timeout
        self._thread: threading.Thread | None = None

    def watch(self, rank: int, what: str, timeout: float) -> None:
        self.current = (rank, what, time.monotonic(), timeout)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="layerpipe-wait-reporter", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        reported = None
        while True:
            time.sleep(self.interval / 4)
            current = self.current
            if current is None:
                continue
            rank, what, started, timeout = current
            waited = time.monotonic() - started
            due = int(waited // self.interval)
            if due >= 1 and reported != (started, due):
                reported = (started, due)
                print(f"rank {rank} still waiting {what}, {waited:.0f} s of {timeout:g}", file=sys.stderr, flush=True)


_REPORTER = _WaitReporter(float(os.environ.get("LAYERPIPE_WAIT_REPORT_SECONDS", "30")))


def wait_for(work, timeout: float, rank: int, what: str) -> None:
    """Wait for ``work`` at most ``timeout`` seconds; on failure raise ``PipelineError`` naming ``rank`` and ``what``.

    The message reads ``rank 0: timed out after 2 s <what> (<cause>)``, or
    ``failed`` instead of ``timed out`` when the peer went away.  A wait of
    more than 30 s (``LAYERPIPE_WAIT_REPORT_SECONDS``) is reported on stderr
    while it lasts.
    """
    _REPORTER.watch(rank, what, timeout)
    try:
        work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as error:
        reason = failure_reason(error)
        timed_out = "timed out" in reason.lower() or "timeout" in reason.lower()
        verb = f"timed out after {timeout:g} s" if timed_out else "failed"
        raise PipelineError(f"rank {rank}: {verb} {what} ({reason})") from error
    finally:
        _REPORTER.current = None


def describe(action: Action) -> str:
    """Return what a receive waits for or a send delivers, in words."""
    return message_of(action).describe()


class Mailbox:
    """The transfers of ``context.rank`` while it runs its program of ``programs``."""

    def __init__(
        self,
        context: RankContext,
        programs: Sequence[Program],
        boundary_metas: Sequence[tuple[TensorMeta, ...]],
        by_receives: bool = False,
    ):
        """``by_receives``: post receives in the order this rank's program receives them, not the order the
        peers' programs send them (a slice of an async stream receives what the peers sent in an earlier call)."""
        self.context = context
        self.boundary_metas = boundary_metas
        rank, placement = context.rank, context.placement
        self.incoming: dict[int, list[Message]] = {}
        if by_receives:
            for action in programs[rank]:
                if action.kind is Kind.RECV_F or action.kind is Kind.RECV_B:
                    self.incoming.setdefault(self._peer_of(action), []).append(message_of(action))
        for peer, program in enumerate(programs if not by_receives else ()):
            if peer == rank:
                continue
            for action in program:
                if action.kind is Kind.SEND_F or action.kind is Kind.SEND_B:
                    if placement.rank_of(peer_stage(action)) == rank:
                        self.incoming.setdefault(peer, []).append(message_of(action))
        self.position = {
            message: (peer, index) for peer, messages in self.incoming.items() for index, message in enumerate(messages)
        }
        self.reset()

    def reset(self) -> None:
        """Forget the transfers of the previous run (call before running the program again)."""
        self.posted = {peer: 0 for peer in self.incoming}
        self.receives: dict[Message, tuple[list, list]] = {}
        self.sends: deque[tuple[Action, list, list]] = deque()
        self.expanded: set[Message] = set()  # messages whose announced tensors' receives are posted
        if self.context.lookahead:
            for peer in self.incoming:
                self._post_through(peer, self.context.lookahead - 1)

    def _tag(self, message: Message, slot: int) -> int:
        return message_tag(message, self.context.tag_window, slot, self.context.tag_offset)

    def _peer_of(self, action: Action) -> int:
        return self.context.placement.rank_of(peer_stage(action))

    def _metas(self, message: Message) -> tuple[TensorMeta, ...]:
        if message.backward:
            metas = stage_metas(self.boundary_metas, message.receiver, message.microbatch)
            return tuple(meta for meta in metas if carries_gradient(meta.dtype))
        return stage_metas(self.boundary_metas, message.sender, message.microbatch)

    def _post_through(self, peer: int, index: int) -> None:
        messages = self.incoming[peer]
        index = min(index, len(messages) - 1)
        while self.posted[peer] <= index:
            message = messages[self.posted[peer]]
            self.receives[message] = self._post(message, peer)
            self.posted[peer] += 1

    @property
    def announced(self) -> bool:
        """Return whether every message announces its shapes (a header ahead of its tensors) instead of agreed ones."""
        return type(self.boundary_metas) is ListedMetas and not self.boundary_metas

    def _post(self, message: Message, peer: int, first_slot: int = 0, metas=None) -> tuple[list, list]:
        """Post the receives of a message's tensors (of ``metas``; its header alone when messages announce shapes)."""
        context = self.context
        source = context.peers[peer]
        if metas is None:
            metas = (HEADER_META,) if self.announced else self._metas(message)
        buffers = [torch.empty(meta.shape, dtype=meta.dtype, device=context.device) for meta in metas]
        group = context.group_of(peer, context.rank)
        works = [
            dist.irecv(buffer, src=source, tag=self._tag(message, first_slot + slot), group=group)
            for slot, buffer in enumerate(buffers)
        ]
        return buffers, works

    def _announced_tensors(self, message: Message, peer: int, header: list, works: list, waiting: str) -> tuple:
        """Wait for a message's header, then receive the tensors it announces (slots after the header's)."""
        self._wait(works, waiting)
        return self._post(message, peer, 1, decode_header(header[0].cpu()))

    def _wait(self, works: list, waiting: str) -> None:
        for work in works:
            wait_for(work, self.context.timeout, self.context.rank, waiting)

    def receive(self, action: Action) -> tuple[torch.Tensor, ...]:
        """Return the tensors ``action`` (a ``RECV``) waits for.

        Raises ``PipelineError`` naming the action and peer when they do not
        arrive within the timeout or the peer is gone.
        """
        message = message_of(action)
        if message in self.position:
            peer, index = self.position[message]
            self._post_through(peer, index + self.context.lookahead)
            buffers, works = self.receives.pop(message)
        else:  # the peer's program never sends it: post anyway, so the wait times out and says so
            peer = self._peer_of(action)
            buffers, works = self._post(message, peer)
        waiting = f"at {action} waiting for {message.describe()} from rank {peer}"
        if self.announced and message not in self.expanded:
            buffers, works = self._announced_tensors(message, peer, buffers, works, waiting)
        self._wait(works, waiting)
        self.poll()
        return tuple(buffers)

    def poll(self) -> None:
        """Post the tensors' receives of every message posted ahead whose header has arrived, so that they too
        arrive while this rank computes (messages that announce their shapes; nothing otherwise)."""
        if not self.announced:
            return
        for message, (buffers, works) in list(self.receives.items()):
            if message not in self.expanded and all(work.is_completed() for work in works):
                peer = self.position[message][0]
                waiting = f"for the header of {message.describe()} from rank {peer}"
                self.receives[message] = self._announced_tensors(message, peer, buffers, works, waiting)
                self.expanded.add(message)

    def send(self, action: Action, tensors: Sequence[torch.Tensor]) -> None:
        """Start sending ``tensors`` for ``action`` (a ``SEND``) without waiting."""
        message = message_of(action)
        peer = self._peer_of(action)
        destination, group = self.context.peers[peer], self.context.group_of(self.context.rank, peer)
        payload = [t.detach().contiguous() for t in tensors]
        if self.announced:  # the header of their shapes goes first, in slot 0
            if len(payload) >= TENSOR_SLOTS:
                raise PipelineError(
                    f"stage {action.stage} passes {len(payload)} tensors; a message of a list of micro-batches "
                    f"carries at most {TENSOR_SLOTS - 1} (and their header): concatenate or stack some of them"
                )
            payload.insert(0, encode_header(metas_of(payload)).to(self.context.device))
        works = [
            dist.isend(tensor, dst=destination, tag=self._tag(message, slot), group=group)
            for slot, tensor in enumerate(payload)
        ]
        self.sends.append((action, works, payload))
        self.poll()

    def finish(self) -> None:
        """Wait for every send of the program (each names its action and peer if it times out)."""
        self.settle(self.sends)

    def take_sends(self) -> deque:
        """Return the sends not yet waited for, and forget them (an async call leaves them to the next)."""
        sends, self.sends = self.sends, deque()
        return sends

    def settle(self, sends: deque) -> None:
        """Wait for ``sends`` (as ``take_sends`` returned them, possibly from an earlier run), emptying it."""
        while sends:
            action, works, _ = sends.popleft()
            peer = self._peer_of(action)
            for work in works:
                wait_for(
                    work,
                    self.context.timeout,
                    self.context.rank,
                    f"at {action} waiting for rank {peer} to receive {describe(action)}",
                )
