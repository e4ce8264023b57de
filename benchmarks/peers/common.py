"""Command line, timing, memory and result writing shared by the peer workers."""

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import model
import torch.distributed as dist
from safetensors.torch import load_file, save_file


def parse_args(argv=None):
    """Return the parsed common worker command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument("--samples", type=int, required=True, help="global batch")
    parser.add_argument("--pipeline", type=int, default=2)
    parser.add_argument("--data", type=int, default=1, help="data-parallel replicas (DeepSpeed only)")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1), help="ZeRO stage (DeepSpeed only)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.blocks % args.pipeline:
        parser.error("--blocks must be a multiple of --pipeline")
    if args.samples % (args.microbatches * args.data):
        parser.error("--samples must be a multiple of --microbatches * --data")
    return args


def stash(gradients: dict) -> str:
    """Save {key: gradient} to a temporary file (kept out of memory while timing); return its path."""
    handle, path = tempfile.mkstemp(suffix=".safetensors")
    os.close(handle)
    save_file({key: grad.detach().clone().contiguous() for key, grad in gradients.items()}, path)
    return path


def time_steps(step, repeats: int) -> list:
    """Run `step()` `repeats` times; return the seconds of each, bracketed by barriers if distributed."""
    grouped = dist.is_available() and dist.is_initialized()
    times = []
    for _ in range(repeats):
        if grouped:
            dist.barrier()
        start = time.perf_counter()
        step()
        if grouped:
            dist.barrier()
        times.append(time.perf_counter() - start)
    return times


def vm_hwm() -> int:
    """Return this process's own peak RSS (VmHWM) in bytes, 0 where /proc is missing.

    ru_maxrss of a process started by fork/vfork + exec from a big parent (torch.distributed.run,
    a benchmark driver) never drops below the parent's RSS at the exec; VmHWM has no such floor.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def finish(args, system: str, schedule: str, times: list, stash_path: str, notes: str) -> dict:
    """Gather peak RSS and gradient errors to rank 0, which writes args.output; close the process group (if any);
    return the result."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # read before the reference is built
    hwm = vm_hwm()
    gradients = load_file(stash_path)  # safetensors: tensors only, nothing unpickled
    os.remove(stash_path)
    errors = model.relative_errors(gradients, model.reference_gradients(args.width, args.blocks, args.samples))
    grouped = dist.is_available() and dist.is_initialized()
    if grouped:
        all_rss, all_errors = [None] * dist.get_world_size(), [None] * dist.get_world_size()
        dist.all_gather_object(all_rss, (rss, hwm))
        dist.all_gather_object(all_errors, errors)
        rank = dist.get_rank()
    else:
        all_rss, all_errors, rank = [(rss, hwm)], [errors], 0
    merged = {}
    for process_errors in all_errors:
        for key, value in process_errors.items():
            merged[key] = max(value, merged.get(key, 0.0))
    expected = 2 * args.blocks  # weight and bias of each Linear
    result = {
        "system": system,
        "schedule": schedule,
        "step_times": times,
        "median": statistics.median(times),
        "peak_rss_bytes_per_process": [r for r, _ in all_rss],
        "peak_vmhwm_bytes_per_process": [h for _, h in all_rss],
        "max_gradient_error": max(merged.values()) if len(merged) == expected else None,
        "notes": f"{notes}; gradients compared for {len(merged)}/{expected} parameters",
    }
    if rank == 0:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=1)
    if grouped:
        dist.barrier()
        dist.destroy_process_group()
    return result
