"""Candidates measured side by side in forked processes (or in this one), for the search."""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from ..knobs import ConfigError
from ..sim.gpt_costs import GPTShape
from ..sim.hardware import Hardware
from .candidates import Candidate
from .measure import PlanEntry, measure


@contextmanager
def evaluator(jobs: int, shape: GPTShape, hardware: Hardware, limit: float):
    """Yield a function that measures a list of candidates, in this process or in ``jobs`` forked ones.

    Refuses, with ``ConfigError`` on ``jobs``, a pool whose process died (out of memory, killed).
    """
    if jobs <= 1:
        yield lambda batch: [measure(candidate, shape, hardware, limit) for candidate in batch]
        return
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_remember, initargs=(shape, hardware, limit))
    try:
        yield lambda batch: list(pool.map(_measure_remembered, batch))
    except BrokenProcessPool:
        raise ConfigError("jobs", jobs, "a simulation process died (out of memory?): try 1") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_REMEMBERED: tuple = ()


def _remember(shape: GPTShape, hardware: Hardware, limit: float) -> None:
    global _REMEMBERED
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to report, once
    _REMEMBERED = (shape, hardware, limit)


def _measure_remembered(candidate: Candidate) -> tuple[PlanEntry | None, float]:
    return measure(candidate, *_REMEMBERED)
