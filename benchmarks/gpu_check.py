"""The CUDA check: everything one GPU can run, in one process, in at most 8 minutes; results named by machine.

    python benchmarks/gpu_check.py                      # on a machine with a CUDA device
    python benchmarks/gpu_check.py --device cpu         # the dry run: same code paths, tiny sizes, seconds

One process, world size 1 (the default group meets in a file store in a
private temporary folder: NCCL on CUDA, gloo on the CPU), one pipeline rank.
Each check is independent: it gets a hard time budget (an alarm raises in it
when the budget is spent) and a failing check is recorded with its error
while the others still run.  The results file is rewritten after every check,
so a run stopped from outside keeps what it had.

Checks (``CHECKS``, in order):

* ``overhead``: the demo GPT trained through ``Pipeline`` at one rank against
  the same layers in plain PyTorch (same AdamW, same micro-batches, gradients
  accumulated), interleaved A B A B; the step-time ratio and, in float32, the
  largest loss difference over the steps (TF32 off).
* ``schedules``: every registered schedule that runs at one rank, three steps
  each, losses against plain PyTorch.
* ``precision``: ``fp32``, ``bf16`` and ``fp16`` (with ``skip_nonfinite``):
  losses finite, their distance from fp32's, step times.
* ``recompute``: ``none``, ``selective`` and ``full``: losses equal to
  ``none``'s, peak memory of the step and step times.
* ``activation_memory``: the executor's activation meter against
  ``torch.cuda.max_memory_allocated`` over one step (CUDA only; on the CPU
  the meter alone).
* ``sparse_linear``: ``NMSparseLinear`` 2:4 (both kernels) against the dense
  layer of the same weight, float32 and bf16, in inference and in training
  (forward and backward): largest differences and times against dense.  In
  bf16 inference on CUDA the layer takes its 2:4 semi-structured path
  (``torch.sparse.to_sparse_semi_structured``, CUDA only, not run before this
  check); the check fails there unless that path ran.
* ``spatial_conv``: ``SpatialConv2d`` and ``SpatialConvTranspose2d`` over a
  group of one, and ``layerpipe.ops.conv_transpose2d``, against
  ``torch.nn.functional`` (forward and gradients, float32 and bf16), with times.

Results: ``benchmarks/results/gpu_check-<gpu>.{json,md}`` (``gpu_check-nvidia-h200``;
``gpu_check-cpu`` for the dry run; ``--output`` changes the folder); each record
names the machine (host, GPU, capability, CUDA, NCCL, torch, backend).  Exit
status 0 when every check passed, 1 when one failed, 3 when one hung past its
budget and the run stopped (the record says which).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BUDGET_SECONDS = 420.0
"""The checks together, on a GPU: seven minutes, leaving the eighth for starting and a hung check's grace."""

HUNG_GRACE_SECONDS = 20.0
"""How long past its budget a check may still run before the watchdog stops the run."""

ROUNDS_SECONDS = 10.0
"""The time one side-by-side timing may take before it stops repeating."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big the model, batch and operators are, and how many steps are timed."""

    model: dict
    batch: int
    microbatches: int
    steps: int
    features: int
    tokens: int
    image: int
    channels: int
    repeats: int


GPU_SIZES = Sizes(
    model={"vocab_size": 80, "block_size": 64, "width": 128, "heads": 4, "blocks": 4},  # the demo model
    batch=64,
    microbatches=4,
    steps=20,
    features=4096,
    tokens=2048,
    image=128,
    channels=64,
    repeats=20,
)
CPU_SIZES = Sizes(
    model={"vocab_size": 32, "block_size": 8, "width": 16, "heads": 2, "blocks": 2},
    batch=8,
    microbatches=2,
    steps=2,
    features=64,
    tokens=16,
    image=12,
    channels=4,
    repeats=2,
)


class CheckTimeout(Exception):
    """A check ran past its budget."""


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise ``CheckTimeout`` in the block when ``seconds`` have passed (SIGALRM; main thread)."""

    def expired(signum, frame):
        raise CheckTimeout(f"ran past its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- helpers


class Context:
    """What every check gets: the device, the sizes, and a clock that waits for the device."""

    def __init__(self, device: torch.device, sizes: Sizes):
        self.device, self.sizes = device, sizes
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, step: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        step()
        self.sync()
        return time.perf_counter() - start

    def alternately(self, steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
        """Return each step's median time over ``repeats`` rounds of A B C A B C ..., after one untimed round.

        Stops early, after two rounds at least, once the rounds have taken ``ROUNDS_SECONDS``.
        """
        for step in steps.values():
            step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        start = time.perf_counter()
        for round_ in range(repeats):
            for name, step in steps.items():
                times[name].append(self.timed(step))
            if round_ >= 1 and time.perf_counter() - start > ROUNDS_SECONDS:
                break
        return {name: statistics.median(values) for name, values in times.items()}

    def reset_peak(self) -> int:
        """Start a new peak of allocated device memory; return what is allocated now (0 on the CPU)."""
        if not self.cuda:
            return 0
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None


def _gpt(context: Context):
    from layerpipe.models.config import GPTConfig
    from layerpipe.models.gpt import gpt_layers, next_token_loss

    return gpt_layers(GPTConfig(**context.sizes.model)), next_token_loss


def _batch(context: Context, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    vocabulary, length = context.sizes.model["vocab_size"], context.sizes.model["block_size"]
    tokens = torch.randint(vocabulary, (context.sizes.batch, length + 1), generator=generator)
    return tokens[:, :-1].to(context.device), tokens[:, 1:].to(context.device)


def _adamw(parameters):
    return torch.optim.AdamW(parameters, lr=1e-3)


def _pipeline(context: Context, layers, loss_fn, schedule: str = "gpipe", **options):
    import layerpipe

    options.setdefault("microbatches", context.sizes.microbatches)
    return layerpipe.Pipeline(
        layers, loss_fn, schedule, optimizer=_adamw, device=context.device, timeout=60, check_every=0, **options
    )


def _plain_step(context: Context, layers, loss_fn, microbatches: int | None = None):
    """Return a step of ``layers`` in plain PyTorch: the same micro-batches, gradients accumulated, one AdamW step."""
    model = nn.Sequential(*layers).to(context.device)
    optimizer = _adamw(model.parameters())
    microbatches = microbatches or context.sizes.microbatches

    def step(inputs, targets) -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for chunk, target in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
            loss = loss_fn(model(chunk), target) / microbatches
            loss.backward()
            total += loss.detach()
        optimizer.step()
        return float(total)

    return step


def _largest_difference(first: list[float], second: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(first, second, strict=True))


# ---------------------------------------------------------------- checks


def check_overhead(context: Context) -> dict:
    """The demo GPT through ``Pipeline`` at one rank against plain PyTorch: step-time ratio and losses."""
    layers, loss_fn = _gpt(context)
    plain = _plain_step(context, copy.deepcopy(layers), loss_fn)
    pipe = _pipeline(context, layers, loss_fn)
    inputs, targets = _batch(context)
    losses = {"layerpipe": [], "plain": []}
    for _ in range(context.sizes.steps):
        losses["layerpipe"].append(pipe.train_step(inputs, targets))
        losses["plain"].append(plain(inputs, targets))
    difference = _largest_difference(losses["layerpipe"], losses["plain"])
    times = context.alternately(
        {"layerpipe": lambda: pipe.train_step(inputs, targets), "plain": lambda: plain(inputs, targets)},
        context.sizes.repeats,
    )
    return {
        "schedule": "gpipe",
        "microbatches": context.sizes.microbatches,
        "steps": context.sizes.steps,
        "largest_loss_difference": difference,
        "losses_equal": difference <= 1e-4 * max(1.0, abs(losses["plain"][0])),
        "step_seconds": times,
        "overhead_ratio": times["layerpipe"] / times["plain"],
        "passed": difference <= 1e-4 * max(1.0, abs(losses["plain"][0])),
    }


def _one_rank_schedules() -> list[tuple[str, dict]]:
    """Return every registered schedule with the options it runs with at one rank (two stages where it loops)."""
    from layerpipe.schedule.config import ScheduleConfig, validate_config
    from layerpipe.schedule.registry import schedule_records

    chosen = []
    for record in schedule_records():
        options = {} if record.family == "contiguous" else {"stages_per_rank": 2}
        if record.options.get("group_size", 0) is None:
            options["group_size"] = 2
        try:
            validate_config(ScheduleConfig(record.name, ranks=1, microbatches=4, **options))
        except Exception:  # a schedule that does not run at one rank: listed with the reason below
            options = None
        chosen.append((record.name, options))
    return chosen


def check_schedules(context: Context) -> dict:
    """Every registered schedule at one rank: three steps, losses against plain PyTorch."""
    results = {}
    inputs, targets = _batch(context)
    for name, options in _one_rank_schedules():
        if options is None:
            results[name] = {"skipped": "does not run at one rank"}
            continue
        try:
            layers, loss_fn = _gpt(context)
            plain = _plain_step(context, copy.deepcopy(layers), loss_fn, 4)
            pipe = _pipeline(context, layers, loss_fn, name, microbatches=4, **options)
            if name == "async":  # never drains: compare that it trains, not the losses
                losses = [pipe.train_step(inputs, targets) for _ in range(3)]
                pipe.flush()
                results[name] = {"losses": losses, "passed": all(map(_finite, losses))}
                continue
            ours = [pipe.train_step(inputs, targets) for _ in range(3)]
            theirs = [plain(inputs, targets) for _ in range(3)]
            difference = _largest_difference(ours, theirs)
            results[name] = {"options": options, "largest_loss_difference": difference, "passed": difference <= 1e-4}
        except Exception as error:  # one schedule's failure is recorded; the others still run
            results[name] = {"error": _one_line(error), "passed": False}
    return {"schedules": results, "passed": all(entry.get("passed", True) for entry in results.values())}


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def check_precision(context: Context) -> dict:
    """``fp32``, ``bf16`` and ``fp16`` (with ``skip_nonfinite``) through ``Pipeline``: losses and step times."""
    inputs, targets = _batch(context)
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        layers, loss_fn = _gpt(context)
        extra = {"skip_nonfinite": True} if precision == "fp16" else {}
        try:
            pipe = _pipeline(context, layers, loss_fn, precision=precision, **extra)
            losses = [pipe.train_step(inputs, targets) for _ in range(context.sizes.steps)]
            seconds = statistics.median(
                context.timed(functools.partial(pipe.train_step, inputs, targets)) for _ in range(context.sizes.repeats)
            )
            results[precision] = {"losses": losses, "step_seconds": seconds, "loss_scale": pipe.loss_scale}
        except Exception as error:
            results[precision] = {"error": _one_line(error)}
    reference = results["fp32"].get("losses")
    for entry in results.values():
        if "losses" in entry and reference:
            entry["largest_difference_from_fp32"] = _largest_difference(entry["losses"], reference)
            entry["finite"] = all(map(_finite, entry["losses"]))
    passed = all("error" not in entry and entry["finite"] for entry in results.values())
    return {"precisions": results, "passed": passed}


def check_recompute(context: Context) -> dict:
    """Recomputation ``none``, ``selective`` and ``full`` (two stages at one rank): losses, peak memory, times."""
    inputs, targets = _batch(context)
    results = {}
    for mode in ("none", "selective", "full"):
        layers, loss_fn = _gpt(context)
        try:
            pipe = _pipeline(context, layers, loss_fn, "breadth-first", stages_per_rank=2, recompute=mode)
            pipe.train_step(inputs, targets)
            context.reset_peak()
            losses = [pipe.train_step(inputs, targets) for _ in range(context.sizes.steps)]
            peak = context.peak()
            seconds = statistics.median(
                context.timed(functools.partial(pipe.train_step, inputs, targets)) for _ in range(context.sizes.repeats)
            )
            results[mode] = {"losses": losses, "peak_bytes": peak, "step_seconds": seconds}
        except Exception as error:
            results[mode] = {"error": _one_line(error)}
    passed = all("error" not in entry for entry in results.values())
    if passed:
        for entry in results.values():
            entry["largest_difference_from_none"] = _largest_difference(entry["losses"], results["none"]["losses"])
        passed = all(entry["largest_difference_from_none"] <= 1e-4 for entry in results.values())
    return {"modes": results, "passed": passed}


def check_activation_memory(context: Context) -> dict:
    """The executor's activation meter beside ``torch.cuda.max_memory_allocated`` over one gpipe step."""
    layers, loss_fn = _gpt(context)
    pipe = _pipeline(context, layers, loss_fn, track_memory=True)
    inputs, targets = _batch(context)
    pipe.train_step(inputs, targets)  # optimizer state and gradients exist from here on
    before = context.reset_peak()
    pipe.train_step(inputs, targets)
    peak = context.peak()
    metered = pipe.memory()["activations"]
    record = {"metered_activation_bytes": metered, "allocated_before_step": before, "peak_during_step": peak}
    if peak is None:
        record["cuda"] = "not on this device: the meter alone"
        record["passed"] = metered is not None and metered > 0
        return record
    above = peak - before
    record.update(peak_above_resting=above, metered_over_measured=metered / above if above else None)
    record["passed"] = metered is not None and 0 < metered <= 2 * above
    return record


def check_sparse_linear(context: Context) -> dict:
    """2:4 ``NMSparseLinear`` (both kernels) against the dense layer of the same weight, float32 and bf16.

    Inference (no autograd) in bf16 on CUDA takes ``NMSparseLinear``'s 2:4 semi-structured path
    (``torch.sparse.to_sparse_semi_structured``); each entry says which path ran.  Training (forward and
    backward) takes the layer's kernel.
    """
    results = {
        str(dtype).removeprefix("torch."): _sparse_in(context, dtype) for dtype in (torch.float32, torch.bfloat16)
    }
    tolerance = {"float32": 1e-3, "bfloat16": 0.1}
    passed = all(
        "largest_difference" in entry and entry["largest_difference"] <= tolerance[name]
        for name, modes in results.items()
        for mode in ("inference", "training")
        for entry in modes[mode].values()
    )
    if context.cuda:  # the CUDA-only path must have run
        passed = passed and all(
            entry["path"] == "semi-structured" for entry in results["bfloat16"]["inference"].values()
        )
    return {"features": context.sizes.features, "tokens": context.sizes.tokens, "dtypes": results, "passed": passed}


def _sparse_in(context: Context, dtype: torch.dtype) -> dict:
    """Return, in ``dtype``, each kernel's largest difference from dense and its time over dense's, both ways."""
    from layerpipe.ops import NMSparseLinear
    from layerpipe.ops.pattern import SPARSE_KERNELS

    features, tokens = context.sizes.features, context.sizes.tokens
    torch.manual_seed(0)
    first = NMSparseLinear(features, features, pattern="2:4", kernel=SPARSE_KERNELS[0])
    layers = {kernel: copy.deepcopy(first).to(context.device, dtype) for kernel in SPARSE_KERNELS}
    for kernel, layer in layers.items():
        layer.kernel = kernel
    dense = nn.Linear(features, features)
    with torch.no_grad():
        dense.weight.copy_(first.dense_weight())
        dense.bias.copy_(first.bias)
    dense = dense.to(context.device, dtype)
    inputs = torch.randn(tokens, features, device=context.device, dtype=dtype)
    everything = {"dense": dense, **layers}
    record = {}
    with torch.no_grad():
        reference = dense(inputs).float()
        record["inference"] = {
            kernel: {
                "path": "semi-structured" if layer._semi_structured_weight(inputs) is not None else kernel,
                **_guarded(lambda layer=layer: float((layer(inputs).float() - reference).abs().max())),
            }
            for kernel, layer in layers.items()
        }
        times = _guarded_times(
            context, {name: functools.partial(module, inputs) for name, module in everything.items()}
        )
    _add_times(record["inference"], times)
    record["training"] = {
        kernel: _guarded(_gradient_difference, layer, dense, inputs) for kernel, layer in layers.items()
    }
    steps = {name: functools.partial(_forward_backward, module, inputs) for name, module in everything.items()}
    _add_times(record["training"], _guarded_times(context, steps))
    return record


def _guarded(measure: Callable, *arguments) -> dict:
    """Return ``{"largest_difference": measure(...)}``, or the error it raised."""
    try:
        return {"largest_difference": measure(*arguments)}
    except Exception as error:
        return {"error": _one_line(error)}


def _guarded_times(context: Context, steps: dict) -> dict:
    """Return the side-by-side times of those of ``steps`` that run (a step that raises is left out)."""
    running = {}
    for name, step in steps.items():
        try:
            step()
            running[name] = step
        except Exception:  # its error is in the record already
            continue
    return context.alternately(running, context.sizes.repeats)


def _forward_backward(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_(True)
    module(inputs).float().square().mean().backward()
    return inputs.grad


def _gradient_difference(layer: nn.Module, dense: nn.Linear, inputs: torch.Tensor) -> float:
    """Return the largest difference of the input gradients of ``layer`` and ``dense``."""
    return float((_forward_backward(layer, inputs).float() - _forward_backward(dense, inputs).float()).abs().max())


def _add_times(entries: dict, times: dict[str, float]) -> None:
    for kernel, entry in entries.items():
        if kernel in times and "dense" in times:
            entry.update(seconds=times[kernel], over_dense=times[kernel] / times["dense"])


def check_spatial_conv(context: Context) -> dict:
    """``SpatialConv2d``, ``SpatialConvTranspose2d`` (group of one) and ``conv_transpose2d`` against torch's."""
    channels, size = context.sizes.channels, context.sizes.image
    results = {
        str(dtype).removeprefix("torch."): _spatial_pairs(context, dtype) for dtype in (torch.float32, torch.bfloat16)
    }
    tolerance = {"float32": 1e-3, "bfloat16": 0.1}
    passed = all(
        result["largest_difference"] <= tolerance[dtype] * max(1.0, result["largest_value"])
        for dtype, entry in results.items()
        for result in entry.values()
    )
    return {"channels": channels, "image": size, "dtypes": results, "passed": passed}


def _spatial_pairs(context: Context, dtype: torch.dtype) -> dict:
    """Return, in ``dtype``, each spatial or transposed convolution's differences from torch's, and the times."""
    from layerpipe.ops import SpatialConv2d, SpatialConvTranspose2d, conv_transpose2d

    channels, size = context.sizes.channels, context.sizes.image
    torch.manual_seed(0)
    convolution = SpatialConv2d(channels, channels, 3, padding=1).to(context.device, dtype)
    transposed = SpatialConvTranspose2d(channels, channels, 4, stride=2, padding=1).to(context.device, dtype)
    image = torch.randn(8, channels, size, size, device=context.device, dtype=dtype)

    def torch_transposed(x):
        return F.conv_transpose2d(x, transposed.weight, transposed.bias, stride=2, padding=1)

    pairs = {
        "spatial_conv2d": (convolution, lambda x: F.conv2d(x, convolution.weight, convolution.bias, padding=1)),
        "spatial_conv_transpose2d": (transposed, torch_transposed),
        "conv_transpose2d": (
            lambda x: conv_transpose2d(x, transposed.weight, transposed.bias, stride=2, padding=1),
            torch_transposed,
        ),
    }
    return {name: _against(context, ours, theirs, image) for name, (ours, theirs) in pairs.items()}


def _against(context: Context, ours, theirs, image) -> dict:
    """Return the largest difference of outputs and input gradients of ``ours`` and ``theirs``, and their times."""
    outputs, gradients = [], []
    for function in (ours, theirs):
        inputs = image.detach().clone().requires_grad_(True)
        output = function(inputs)
        output.float().square().sum().backward()
        outputs.append(output.detach().float())
        gradients.append(inputs.grad.float())
    difference = max(float((outputs[0] - outputs[1]).abs().max()), float((gradients[0] - gradients[1]).abs().max()))
    with torch.no_grad():
        times = context.alternately(
            {"ours": lambda: ours(image), "torch": lambda: theirs(image)}, context.sizes.repeats
        )
    return {
        "largest_difference": difference,
        "largest_value": float(outputs[1].abs().max()),
        "seconds": times,
        "over_torch": times["ours"] / times["torch"],
    }


CHECKS: dict[str, tuple[Callable[[Context], dict], float]] = {
    "overhead": (check_overhead, 90.0),
    "schedules": (check_schedules, 90.0),
    "precision": (check_precision, 60.0),
    "recompute": (check_recompute, 60.0),
    "activation_memory": (check_activation_memory, 30.0),
    "sparse_linear": (check_sparse_linear, 60.0),
    "spatial_conv": (check_spatial_conv, 60.0),
}
"""Each check and its hard budget in seconds on a GPU (450 s together; the run's ``BUDGET_SECONDS`` cuts the last)."""


# ---------------------------------------------------------------- running


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}".strip()


def machine(device: torch.device) -> dict:
    """Return where the check ran: host, CPU, torch, and on CUDA the GPU, its capability and CUDA's version."""
    record = {
        "host": platform.node(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        record.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            capability=f"{properties.major}.{properties.minor}",
            cuda=torch.version.cuda,
            nccl=_nccl_version(),
        )
    return record


def _nccl_version() -> str | None:
    if not dist.is_nccl_available():
        return None
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def result_name(about: dict) -> str:
    """Return the results' file name: ``gpu_check-`` and the GPU's name (``nvidia-h200``), or the device type."""
    named = about.get("gpu", about["device"].split(":")[0]).lower()
    return "gpu_check-" + "-".join("".join(c if c.isalnum() else " " for c in named).split())


def run_all(record: dict, names: list[str], context: Context, scale: float, output: str) -> None:
    """Run ``names`` in turn within the run's budget, writing the record after each.

    A watchdog stops the whole run (exit 3, the record written) when a check is still running
    ``HUNG_GRACE_SECONDS`` past its budget: the alarm cannot interrupt a wait inside the device's library.
    """
    start = time.perf_counter()
    for name in names:
        left = BUDGET_SECONDS * scale - (time.perf_counter() - start)
        if left < 1:
            record["checks"][name] = {"status": "error", "passed": False, "error": "the run's time was spent"}
            continue
        budget = min(left, CHECKS[name][1] * scale)
        watchdog = threading.Timer(budget + HUNG_GRACE_SECONDS, _stop_hung, (record, name, output))
        watchdog.daemon = True
        watchdog.start()
        try:
            record["checks"][name] = run_check(name, context, budget)
        finally:
            watchdog.cancel()
        write(record, output, result_name(record["machine"]))
        print(f"{name}: {record['checks'][name]['status']} ({record['checks'][name]['seconds']:.1f} s)", flush=True)


def _stop_hung(record: dict, name: str, output: str) -> None:
    record["checks"][name] = {"status": "error", "passed": False, "error": "hung past its budget: the run stopped"}
    write(record, output, result_name(record["machine"]))
    print(f"{name}: hung past its budget; stopping", file=sys.stderr, flush=True)
    os._exit(3)


def run_check(name: str, context: Context, budget: float) -> dict:
    """Run one check under its hard budget; return its record (its error and traceback where it failed)."""
    check, _ = CHECKS[name]
    start = time.perf_counter()
    try:
        with hard_limit(budget):
            record = check(context)
        record.setdefault("passed", True)
        record["status"] = "passed" if record["passed"] else "failed"
    except BaseException as error:  # a check's failure, its timeout included, is its result
        if isinstance(error, KeyboardInterrupt):
            raise
        record = {"status": "error", "passed": False, "error": _one_line(error), "traceback": traceback.format_exc()}
    record["seconds"] = time.perf_counter() - start
    record["budget_seconds"] = budget
    if context.cuda:
        torch.cuda.empty_cache()
    return record


def start_process_group(device: torch.device, folder: str, backend: str | None) -> str:
    """Start the default process group of one process in ``folder``'s file store: by default NCCL on CUDA (as
    ``layerpipe.launch`` and torchrun runs get it), gloo on the CPU; return the backend."""
    from layerpipe.runtime.launch import init_process_group

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    init_process_group(60.0, backend, store=dist.FileStore(os.path.join(folder, "store"), 1))
    return backend


def summary_lines(record: dict) -> list[str]:
    """Return the Markdown summary: the machine, then one row per check."""
    about = record["machine"]
    lines = [
        f"# GPU check on {about.get('gpu', about['device'])} ({about['host']}, torch {about['torch']}, "
        f"CUDA {about.get('cuda')}, {about.get('backend')}), {record['started']}",
        "",
        "| check | status | seconds | budget | what |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, check in record["checks"].items():
        lines.append(
            f"| {name} | {check['status']} | {check.get('seconds', 0):.1f} | {check.get('budget_seconds', 0):g} "
            f"| {_headline(name, check)} |"
        )
    return lines


def _headline(name: str, check: dict) -> str:
    if "error" in check:
        return check["error"].replace("|", "/")
    if name == "overhead":
        return (
            f"layerpipe / plain step time {check['overhead_ratio']:.3f}, "
            f"largest loss difference {check['largest_loss_difference']:.2e}"
        )
    if name == "activation_memory" and check.get("metered_over_measured") is not None:
        return f"metered / measured activations {check['metered_over_measured']:.3f}"
    return ""


def write(record: dict, folder: str, name: str) -> str:
    """Write ``record`` as ``<folder>/<name>.json`` and its summary as ``.md``; return the JSON's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path + ".part", "w") as handle:
        json.dump(record, handle, indent=2, default=str)
    os.replace(path + ".part", path)
    with open(os.path.join(folder, f"{name}.md"), "w") as handle:
        handle.write("\n".join(summary_lines(record)) + "\n")
    return path


def main(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the dry run: tiny sizes)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated names, of: " + ", ".join(CHECKS))
    parser.add_argument("--backend", default=None, help="the process group's backend (default: nccl on cuda, gloo)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every check's budget by this")
    options = parser.parse_args(arguments)
    device = torch.device(options.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu for the dry run", file=sys.stderr)
        return 2
    names = [name.strip() for name in options.checks.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {', '.join(unknown)}: choose from {', '.join(CHECKS)}")
    context = Context(device, GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    if context.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 losses compared to 1e-4
        torch.backends.cudnn.allow_tf32 = False
    record = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(device),
        "sizes": dataclasses.asdict(context.sizes),
        "checks": {name: {"status": "not run"} for name in names},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        record["machine"]["backend"] = start_process_group(device, folder, options.backend)
        try:
            run_all(record, names, context, options.budget_scale, options.output)
        finally:
            dist.destroy_process_group()
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    path = write(record, options.output, result_name(record["machine"]))
    print(f"wrote {path}")
    return 0 if all(check.get("passed") for check in record["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
