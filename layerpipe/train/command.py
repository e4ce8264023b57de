"""``layerpipe train``: read the options, start the processes (or join torchrun's), and answer failures in one line."""

from __future__ import annotations

import os
import sys

from ..knobs import ConfigError
from .config import build_parser, config_from

STOPPED = "layerpipe.train.loop.TrainingStopped: "
"""How a rank's report ends when the training loop stopped on purpose."""

INTERRUPTED = 130
"""Exit status after Ctrl-C, as a shell reports a process ended by SIGINT."""


def under_torchrun() -> bool:
    """Return whether this process was started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def main(argv: list[str] | None = None) -> int:
    """Run ``layerpipe train``; return the exit status.

    2 for bad options (one line on stderr, before any process starts), 1 when
    a rank fails (its report on stderr), 130 after Ctrl-C (one line).
    """
    arguments = build_parser().parse_args(argv)
    try:
        config = config_from(arguments, int(os.environ["WORLD_SIZE"]) if under_torchrun() else None)
    except ConfigError as error:
        print(f"layerpipe train: error: {error}", file=sys.stderr)
        return 2
    try:
        return _run_here(config) if under_torchrun() else _launch(config)
    except KeyboardInterrupt:
        print("\nlayerpipe train: interrupted", file=sys.stderr)  # after the progress bar's unfinished line
        return INTERRUPTED


def _run_here(config) -> int:
    """Train in this process, one of torchrun's; end the process group (and its threads) before returning.

    Every rank waits for the others to finish (rank 0 writes the outputs),
    then drops the run's objects — collected now, not at interpreter exit,
    where a process group still alive aborts the process — and destroys
    the group.
    """
    import gc

    import torch.distributed as dist

    from ..checkpoint_files import checkpoints_of, latest_checkpoint
    from .config import replaced
    from .loop import run

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    latest = latest_checkpoint(checkpoints_of(config.output))
    if restarted and config.resume is None and latest is not None:  # torchrun --max-restarts started us again
        config = replaced(config, resume=latest)
    finished = False
    try:
        run(config)
        finished = True
    finally:
        if dist.is_initialized():
            if finished:
                dist.barrier()
            gc.collect()
            dist.destroy_process_group()
    return 0


def _launch(config) -> int:
    """Run the training on local processes; after a failure, start again from the latest checkpoint (``max_restarts``)."""
    from ..checkpoint_files import checkpoints_of, latest_checkpoint
    from ..runtime.launch import LaunchError, launch
    from .config import replaced
    from .loop import run

    for attempt in range(config.max_restarts + 1):
        try:
            launch(run, config.processes, (config,), timeout=config.timeout)
            return 0
        except LaunchError as error:
            stopped = [
                report.strip().splitlines()[-1]
                for report in error.reports.values()
                if report.strip().splitlines()[-1].startswith(STOPPED)
            ]
            if stopped:  # training decided to stop: its own line says why
                print(f"layerpipe train: stopped: {stopped[0].removeprefix(STOPPED)}", file=sys.stderr)
                return 1
            if attempt == config.max_restarts:
                print(f"layerpipe train: failed\n{error}", file=sys.stderr)
                return 1
            latest = latest_checkpoint(checkpoints_of(config.output))
            lines = str(error).splitlines()
            what = " ".join(line.strip() for line in lines[:2])
            where = f"from {latest}" if latest is not None else "from the beginning (no checkpoint yet)"
            print(
                f"layerpipe train: {what}; restarting {where} ({attempt + 1} of {config.max_restarts})", file=sys.stderr
            )
            if latest is not None:
                config = replaced(config, resume=latest)
    return 1
