"""Start local processes with a process group each: for notebooks, tests and the demo.

``launch(fn, nprocs)`` starts ``nprocs`` processes on this machine, sets the
same environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), initialises the default process group
through a file store in a private temporary folder (so no port is opened
that another host could reach; gloo is held to the loopback interface),
calls ``fn(*args)`` in each and returns the per-rank results.  When a rank
fails, the others get a short grace period to report their own failure and
are then stopped; ``LaunchError`` leads with the first failure's cause in
one line and carries every rank's report, the first failure's traceback in
full.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: this module's functions take ``group=group.WORLD`` as a
# default, evaluated at import.  Imported later (torch.optim does, lazily, through torch._dynamo) they would hold the
# default group, and with it gloo's threads, past ``destroy_process_group`` until interpreter exit, where a joinable
# thread aborts the process now and then ("terminate called without an active exception", exit -6).
import torch.distributed.nn.functional

from .failure import one_line

GRACE_SECONDS = 3.0
"""How long the other ranks may keep running after one rank failed, to report their own state."""


class LaunchError(RuntimeError):
    """One or more ranks failed; ``reports`` maps rank to what it reported (its traceback).

    The message's first line names the rank that failed first, where (the
    action, the layer) and its original exception:
    ``rank 1 failed: at 1F2, in layer 1 (Net) of stage 1: ValueError: ...``;
    then one line per other rank (their consequences), then the first
    rank's full report.  A rank that died without reporting (killed by a
    signal) comes first — the others' errors follow from its absence — then
    the rest by when they reported.  ``summaries`` holds each rank's one
    line where the rank could write it (else its report's last line is used).
    """

    def __init__(
        self,
        reports: dict[int, str],
        failed_at: dict[int, float] | None = None,
        died: set[int] | None = None,
        summaries: dict[int, str] | None = None,
    ):
        self.reports = reports
        failed_at, died, summaries = failed_at or {}, died or set(), summaries or {}
        first = min(reports, key=lambda rank: (rank not in died, failed_at.get(rank, float("inf")), rank))
        self.summaries = {rank: summaries.get(rank) or _last_line(report) for rank, report in reports.items()}
        lines = [f"rank {first} failed: {self.summaries[first]}"]
        lines += [f"rank {rank}: {_shortened(self.summaries[rank])}" for rank in sorted(reports) if rank != first]
        if reports[first].strip() != self.summaries[first]:
            lines += [f"rank {first}'s report:", reports[first].rstrip()]
        super().__init__("\n".join(lines))


def _shortened(line: str, most: int = 200) -> str:
    """Return ``line`` cut to ``most`` characters (another rank's consequence, not the cause)."""
    return line if len(line) <= most else line[: most - 1] + "…"


def _last_line(report: str) -> str:
    """Return a report's last non-empty line (a traceback's exception line)."""
    lines = [line.strip() for line in report.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no report)"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def default_backend() -> str:
    """Return ``nccl`` when CUDA devices are present, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_process_group(timeout: float = 300.0, backend: str | None = None, store=None) -> None:
    """Initialise the default process group from the ``torchrun`` environment, unless it already exists.

    With ``store`` (the local launcher's file store) the group meets there
    instead of at ``MASTER_ADDR:MASTER_PORT``.

    Sets one intra-op thread per process on CPU (``LAYERPIPE_THREADS`` overrides).  Whoever calls it ends the
    group with ``dist.destroy_process_group()`` before the process exits; nothing in layerpipe keeps it alive past
    that (see the import of ``torch.distributed.nn.functional`` above).
    """
    if dist.is_initialized():
        return
    if store is None and not all(name in os.environ for name in ("RANK", "WORLD_SIZE")):
        raise RuntimeError(
            "layerpipe runs one process per pipeline rank, started together, and this process was not: call your "
            "function with layerpipe.launch(fn, nprocs), or start the script with torchrun --nproc-per-node N "
            "(RANK and WORLD_SIZE are not set)"
        )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(int(os.environ.get("LAYERPIPE_THREADS", "1")))
    store = store if store is not None else elastic_restart_store(timeout)
    if store is None:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    else:
        dist.init_process_group(
            backend,
            store=store,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=datetime.timedelta(seconds=timeout),
        )


def elastic_restart_store(timeout: float):
    """Return torchrun's shared store seen through a prefix of this restart, or ``None`` when none is needed.

    torchrun's agent keeps one store for every restart of its workers
    (``TORCHELASTIC_USE_AGENT_STORE``), and the process group's keys are the
    same each time, so a restarted process may read the address a killed
    process published and fail with gloo's "Connection refused" (PyTorch
    issue 135712).  A prefix per ``TORCHELASTIC_RESTART_COUNT`` keeps each
    restart's keys apart.  The count is the agent's own: on one machine
    every process agrees on it; across machines it can differ, and there
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store each round) is
    the remedy.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart == 0:
        return None
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return dist.PrefixStore(f"layerpipe/restart-{restart}", shared)


def loopback_interface() -> str | None:
    """Return the name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS), if it has one."""
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((name for name in names if name in ("lo", "lo0")), None)


def _worker(
    rank: int, nprocs: int, port: int, fn: Callable, args: tuple, result_dir: str, timeout: float, backend: str | None
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    loopback = loopback_interface()
    if loopback is not None:  # gloo's connections stay on this machine
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    path = os.path.join(result_dir, f"rank{rank}.pickle")
    try:
        # The processes meet in a file in the launcher's private folder: no port open to other hosts.
        init_process_group(timeout, backend, store=dist.FileStore(os.path.join(result_dir, "store"), nprocs))
        if dist.get_backend() == "gloo":
            # Every rank's connections are up before any may refuse at once and leave: a peer still connecting
            # would fail with gloo's "connection closed by peer" instead of reporting the refusal.
            dist.barrier()
        result = ("ok", fn(*args))
    except BaseException as error:
        result = ("error", traceback.format_exc(), time.time(), one_line(error))
    try:
        with open(path + ".part", "wb") as handle:
            pickle.dump(result, handle)
    except Exception:
        with open(path + ".part", "wb") as handle:
            pickle.dump(("error", traceback.format_exc(), time.time()), handle)
    os.replace(path + ".part", path)
    if result[0] == "ok" and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if result[0] == "ok" else 1)


def _start_method(requested: str | None) -> str:
    if requested:
        return requested
    # fork starts in milliseconds and runs functions defined in a notebook; CUDA forbids it once initialised.
    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: tuple = (),
    *,
    timeout: float = 300.0,
    backend: str | None = None,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` local processes with a process group; return each rank's result.

    ``timeout`` (seconds) bounds every collective and transfer of the
    process group.  Raises ``LaunchError`` naming the failing rank with its
    traceback, and what the other ranks reported, when any rank fails.
    Refuses ``nprocs < 1`` and a timeout that is not a positive number of seconds with ``ValueError``.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs {nprocs}: must be at least 1")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout {timeout!r}: must be a finite number of seconds above 0")
    context = multiprocessing.get_context(_start_method(start_method))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="layerpipe-launch-") as result_dir:
        processes = [
            context.Process(
                target=_worker, args=(rank, nprocs, port, fn, args, result_dir, timeout, backend), daemon=False
            )
            for rank in range(nprocs)
        ]
        for process in processes:
            process.start()
        try:
            ended_at, stopped = _wait(processes)
        except KeyboardInterrupt:  # Ctrl-C: every process ends, and the caller says so once
            _stop(processes)
            raise
        results, reports, failed_at, died, summaries = [], {}, {}, set(), {}
        for rank, process in enumerate(processes):
            path = os.path.join(result_dir, f"rank{rank}.pickle")
            if os.path.exists(path):
                with open(path, "rb") as handle:  # written by this launcher's own child, in its private folder
                    status, value, *when = pickle.load(handle)
                summaries.update({rank: when.pop()} if len(when) == 2 else {})
            elif rank in stopped:
                status, value, when = "error", "stopped by the launcher after another rank failed", []
            else:  # it died without reporting: a signal, or an exit past the worker's own handling
                status, value, when = "error", _death_report(process), [ended_at.get(rank, time.time())]
                died.add(rank)
            if status == "ok":
                results.append(value)
            else:
                reports[rank] = value
                failed_at.update({rank: when[0]} if when else {})
        if reports:
            raise LaunchError(reports, failed_at, died, summaries)
        return results


def _death_report(process) -> str:
    """Return how a process that left no report ended: the signal that killed it, or its exit status."""
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by signal {-code} ({name}) before it could report (pid {process.pid})"
    return f"exited with status {code} without reporting a result (pid {process.pid})"


def _wait(processes) -> tuple[dict[int, float], set[int]]:
    """Wait for every process; once one fails, give the rest ``GRACE_SECONDS`` and then stop them.

    Returns when each process was first seen ended (wall-clock seconds) and
    which ones the launcher stopped, so the report can name the one that
    failed first.
    """
    failed_at, ended_at = None, {}
    while True:
        now = time.time()
        for rank, process in enumerate(processes):
            if process.exitcode is not None and rank not in ended_at:
                ended_at[rank] = now
        alive = [p for p in processes if p.exitcode is None]
        if not alive:
            return ended_at, set()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
            stopped = {rank for rank, process in enumerate(processes) if process.exitcode is None}
            _stop(alive)
            return ended_at, stopped
        alive[0].join(0.05)


def _stop(processes) -> None:
    """End every process still running: terminate, and kill what has not ended five seconds later."""
    alive = [process for process in processes if process.exitcode is None]
    for process in alive:
        process.terminate()
    for process in alive:
        process.join(5)
        if process.exitcode is None:
            process.kill()
            process.join()
