"""What the planner is asked: the request's knobs, the named models and the hardware figures it plans for."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass

from ..knobs import ConfigError, knob, number, one_of, whole
from ..sim.cost_file import read_cost_file
from ..sim.gpt_costs import SIZES, GPTShape, layer_parameters
from ..sim.hardware import PRESETS, Hardware, hardware_from_cost_file

GIB = 2.0**30

MODELS = {
    "demo": GPTShape(vocab_size=80, block_size=64, width=128, heads=4, blocks=4),
    "gpt-52b": GPTShape(vocab_size=51200, block_size=2048, width=8192, heads=64, blocks=64),
}
"""Named models: ``demo`` is ``layerpipe train``'s GPT on the 80 characters of Shakespeare's plays; ``gpt-52b`` the 52-billion-
parameter GPT of Lamy-Poirier's breadth-first paper (64 layers of width 8192, 2048 tokens; 64 heads and the GPT-2
vocabulary padded to 51,200 are this project's choices)."""


USABLE_MEMORY = 0.9
"""Share of a GPU's memory the planner fills: the rest is left to the framework's context, workspaces and
fragmentation."""


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for (see each field's help)."""

    model: str = knob(
        "demo",
        "the GPT: demo (layerpipe train's), gpt-52b, or a TOML file with block_size, width, "
        "heads, blocks and vocab_size (a train --config file works)",
        metavar="CONFIG",
    )
    gpus: int = knob(
        2, "devices (processes) to use: pipeline ranks × data-parallel replicas", check=whole(1), metavar="N"
    )
    gpu_memory: float = knob(80.0, "memory of one device in GiB", check=number(0.0, above=True), metavar="GIB")
    global_batch: int = knob(32, "sequences per step over all replicas", check=whole(1), metavar="B")
    cluster: str = knob(
        "h100",
        "hardware figures: " + ", ".join(PRESETS) + " (eight GPUs per node on NVLink, "
        "InfiniBand between nodes); a --cost-file replaces them",
        check=one_of(tuple(PRESETS)),
        metavar="NAME",
    )
    cost_file: str | None = knob(
        None,
        "plan for the machine this cost file was measured on (layerpipe calibrate)",
        metavar="FILE",
        default_text="none: use --cluster",
    )
    top: int = knob(5, "configurations to print, best first", check=whole(1), metavar="K")
    max_stages_per_rank: int = knob(8, "largest number of stages per rank to try", check=whole(1), metavar="V")
    max_microbatch_size: int = knob(16, "largest micro-batch (sequences) to try", check=whole(1), metavar="N")
    jobs: int = knob(
        0, "processes that simulate candidates side by side (0: one per core)", check=whole(0), metavar="J"
    )
    output: str = knob(
        "plan.toml", "write the best configuration here, as a layerpipe train --config file", metavar="FILE.toml"
    )


def model_shape(model: str) -> GPTShape:
    """Return the GPT named by ``model`` (a name in ``MODELS`` or a TOML file's sizes).

    Refuses, with ``ConfigError`` on ``model``, an unknown name, an
    unreadable file and sizes that are not positive whole numbers or whose
    heads do not divide the width.
    """
    if model in MODELS:
        return MODELS[model]
    if not os.path.isfile(model):
        raise ConfigError(
            "model",
            model,
            f"choose one of {', '.join(MODELS)}, or give a TOML file with block_size, "
            f"width, heads, blocks and vocab_size",
        )
    try:
        with open(model, "rb") as handle:
            values = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError("model", model, f"cannot be read as TOML ({error})") from None
    sizes = {
        **dataclasses.asdict(MODELS["demo"]),
        **{key: values[key] for key in SIZES if key in values},
    }
    bad = next(
        (key for key, value in sizes.items() if isinstance(value, bool) or not isinstance(value, int) or value < 1),
        None,
    )
    if bad is not None:
        raise ConfigError("model", model, f"its {bad} = {sizes[bad]!r} must be a whole number of at least 1")
    if sizes["width"] % sizes["heads"]:
        raise ConfigError("model", model, f"its heads ({sizes['heads']}) must divide its width ({sizes['width']})")
    return GPTShape(**sizes)


def hardware_of(request: PlanRequest) -> Hardware:
    """Return the hardware figures: the cost file's (this machine) or the cluster preset's."""
    if request.cost_file is None:
        return PRESETS[request.cluster]
    return hardware_from_cost_file(request.cost_file, read_cost_file(request.cost_file), "cost_file")


def describe_shape(shape: GPTShape) -> str:
    """Return the model in a few words, e.g. ``a 52.4-billion-parameter GPT (64 blocks of width 8192, 2048 tokens)``."""
    parameters = sum(layer_parameters(shape))
    size = f"{parameters / 1e9:.3g}-billion" if parameters >= 1e9 else f"{parameters / 1e6:.3g}-million"
    return f"a {size}-parameter GPT ({shape.blocks} blocks of width {shape.width}, {shape.block_size} tokens)"
