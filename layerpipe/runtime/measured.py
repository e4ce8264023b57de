"""Measured timelines and memory: what a pipeline's last run did, gathered into the simulator's formats."""

from __future__ import annotations

import dataclasses

import torch

from ..schedule.actions import parse_action
from ..sim.timeline import Timeline, TimelineEvent
from .exchange import all_gather_json
from .executor import Executor
from .memory import optimizer_state_bytes
from .run_state import RunResult
from .stream.versions import VersionRecord


def measured_timeline(
    last: RunResult | None, records: list[VersionRecord], with_records: bool, pipeline, title: str
) -> Timeline:
    """Return the timeline of ``last`` (this rank's run) with the other ranks' of this replica (collective).

    ``pipeline`` is the ``Pipeline``; ``records``, this rank's version
    records of the run's sub-minibatches, go into ``metadata`` when
    ``with_records`` (the async stream).  Times are seconds from the
    earliest start on any rank.
    """
    events = list(last.events) if last is not None else []
    if pipeline.layout.pipeline > 1:
        mine = {
            "events": [[r, stream, str(action), start, end] for r, stream, action, start, end in events],
            "records": [dataclasses.astuple(record) for record in records],
        }
        gathered = all_gather_json(mine, pipeline.groups.pipeline, pipeline.device)
        events = [
            (r, stream, parse_action(action), start, end)
            for part in gathered
            for r, stream, action, start, end in part["events"]
        ]
        records = sorted(VersionRecord(*fields) for part in gathered for fields in part["records"])
    config = pipeline.schedule.config
    metadata = {"config": config.to_json()}
    if with_records:
        metadata["version_records"] = [dataclasses.asdict(record) for record in records]
    origin = min((event[3] for event in events), default=0.0)
    rows = tuple(
        sorted(
            (
                TimelineEvent(r, stream, action, start - origin, end - origin)
                for r, stream, action, start, end in events
            ),
            key=lambda row: (row[0], row[3]),
        )
    )
    return Timeline(config.ranks, rows, "measured", "s", title or config.schedule, metadata)


def memory_in_last_step(last: RunResult | None, optimizers: dict, executor: Executor) -> dict[str, int | None]:
    """Return a process's memory in its last training step, in bytes (see ``Pipeline.memory``)."""
    peak = last.buffer_peak if last is not None else {}
    return {
        "activations": last.peak_activation_bytes if last is not None else None,
        "parameters": peak.get("parameters", 0),
        "gradients": peak.get("gradients", 0),
        "optimizer": optimizer_state_bytes(optimizers.values()),
        "forward_activations": dict(executor.forward_bytes),
        "recomputed_activations": dict(executor.recompute_bytes),
    }


def peak_memory_bytes(device: torch.device) -> int:
    """Return this process's peak memory: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
