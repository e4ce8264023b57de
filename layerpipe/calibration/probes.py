"""What ``layerpipe calibrate`` measures beside a training step: links, collectives and core sharing.

Each function is collective over the world and returns the same numbers
on every process (rank 0's measurement, broadcast).  Times in seconds,
bandwidths in bytes per second.  Every wait gives up after ``TIMEOUT``
seconds (``set_timeout``) with a ``PipelineError`` naming the rank and
what it waited for.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..runtime.p2p import wait_for

SMALL, LARGE = 8, 4 << 20
"""Bytes of the messages that measure latency and bandwidth."""

TIMEOUT = 300.0
"""Seconds any wait of a calibration gives up after (``set_timeout``)."""


def set_timeout(seconds: float) -> None:
    """Make every later wait of these measurements give up after ``seconds``."""
    global TIMEOUT
    TIMEOUT = seconds


def _done(work, what: str) -> None:
    """Wait for ``work`` at most ``TIMEOUT`` seconds; on failure raise ``PipelineError`` naming the rank and ``what``."""
    wait_for(work, TIMEOUT, dist.get_rank(), what)


def _barrier(what: str) -> None:
    _done(dist.barrier(async_op=True), f"waiting at the barrier before {what}")


def _shared(values: list[float]) -> list[float]:
    """Return rank 0's ``values`` on every process."""
    tensor = torch.tensor(values, dtype=torch.float64)
    _done(dist.broadcast(tensor, src=0, async_op=True), "waiting for process 0's measurement")
    return tensor.tolist()


def _round_trip(size: int, repeats: int, peer: int) -> float:
    """Return the median time of a message of ``size`` bytes from rank 0 to ``peer`` and back (0 elsewhere)."""
    rank = dist.get_rank()
    message = torch.zeros(size // 4, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if rank == 0:
            _done(dist.isend(message, dst=peer), f"sending a timing message to process {peer}")
            _done(dist.irecv(message, src=peer), f"waiting for process {peer} to send the timing message back")
        elif rank == peer:
            _done(dist.irecv(message, src=0), "waiting for process 0's timing message")
            _done(dist.isend(message, dst=0), "sending the timing message back to process 0")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def point_to_point(repeats: int = 30) -> tuple[float, float]:
    """Return ``(latency, bandwidth)`` of a message between process 0 and process 1 (half a round trip each)."""
    if dist.get_world_size() < 2:
        return 0.0, float("inf")
    small = _round_trip(SMALL, repeats, peer=1) / 2
    large = _round_trip(LARGE, max(5, repeats // 3), peer=1) / 2
    latency, transfer = _shared([small, large])
    return latency, LARGE / max(transfer - latency, 1e-9)


def collective(repeats: int = 20) -> tuple[float, float]:
    """Return ``(latency, bandwidth)`` of an all-reduce over every process, as the cost model's ring reads them:
    ``latency + 2 (d - 1) / d · bytes / bandwidth``."""
    world = dist.get_world_size()
    if world < 2:
        return 0.0, float("inf")

    def timed(size: int) -> float:
        tensor, times = torch.zeros(size // 4, dtype=torch.float32), []
        for _ in range(repeats):
            _barrier("timing an all-reduce")
            start = time.perf_counter()
            _done(dist.all_reduce(tensor, async_op=True), "waiting in an all-reduce timed over every process")
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    small, large = _shared([timed(SMALL), timed(LARGE)])
    return small, 2 * (world - 1) / world * LARGE / max(large - small, 1e-9)


def core_sharing(work, repeats: int = 10) -> float:
    """Return how much slower ``work()`` runs on process 0 while every process runs its own, than alone.

    The reason a simulator fed with times measured one process at a time
    predicts a step too fast when processes share cores.
    """
    rank = dist.get_rank()

    def timed(everyone: bool) -> float:
        times = []
        for _ in range(repeats):
            _barrier("timing a forward beside the others")
            start = time.perf_counter()
            if everyone or rank == 0:
                work()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    alone, together = _shared([timed(False), timed(True)])
    return together / alone if alone > 0 else 1.0


def shared(value: float) -> float:
    """Return process 0's ``value`` on every process (collective)."""
    return _shared([value])[0]


def alone(work, repeats: int = 10) -> float:
    """Return the median time of ``work()`` on process 0 while every other process waits (collective)."""
    rank, times = dist.get_rank(), []
    for _ in range(repeats):
        _barrier("timing work on process 0 alone")
        start = time.perf_counter()
        if rank == 0:
            work()
        times.append(time.perf_counter() - start)
    return shared(statistics.median(times))


def split_backward_ratio(stage, inputs: tuple, repeats: int = 10) -> float:
    """Return how much longer a backward split in two (input gradients, then weight gradients, as zero-bubble runs
    it) takes than one whole backward of ``stage`` on ``inputs`` (floating inputs need gradients), on process 0 alone
    (collective).  1 when process 0's ``stage`` has no floating input."""
    if not shared(float(any(tensor.is_floating_point() for tensor in inputs))):  # process 0's stage decides
        return 1.0
    parameters = [parameter for parameter in stage.parameters() if parameter.requires_grad]

    def forward():
        leaves = [tensor.detach().requires_grad_(tensor.is_floating_point()) for tensor in inputs]
        outputs = [output for output in stage(*leaves) if output.requires_grad]
        return [leaf for leaf in leaves if leaf.requires_grad], outputs, [torch.ones_like(o) for o in outputs]

    def whole():
        _, outputs, gradients = forward()
        torch.autograd.backward(outputs, gradients)

    def split():
        leaves, outputs, gradients = forward()
        torch.autograd.grad(outputs, leaves, gradients, retain_graph=True)
        torch.autograd.backward(outputs, gradients, inputs=parameters)

    def forward_only():
        forward()

    base, one, two = (alone(work, repeats) for work in (forward_only, whole, split))
    stage.zero_grad(set_to_none=True)
    if one - base < 0.05 * base:  # too noisy to read: the backward hardly took longer than the forward alone
        return 1.0
    return max(1.0, (two - base) / (one - base))
