"""The accelerator-style operators against their dense and zero-insertion counterparts, side by side.

    python benchmarks/operators.py [--repeats 15] [--quick]

N:M sparse linear layers (patterns 2:4, 1:4, 4:8; widths 256-1024; 1024
tokens): weight bytes (dense, compressed values + one-byte offsets as
stored, values + offsets packed to log2(M) bits as hardware holds them),
multiplies, and the CPU time of the forward and of forward + backward
for ``nn.Linear`` (dense BLAS), ``NMSparseLinear`` with the gather kernel
and with the dense kernel.  On CUDA, 2:4 fp16 inference through PyTorch's
semi-structured kernels against dense fp16 as well.

Transposed convolution (batch 4, 32 channels in and out, 16²-64² inputs,
strides 1-4, kernel 2·stride and kernel 3): multiplies of the phase
method, of zero insertion and the useful ones, and the time of the phase
method, of zero insertion (spread the input with zeros, pad, convolve with
the flipped kernel) and of PyTorch's ``conv_transpose2d``.

Every comparison interleaves its variants (A B C A B C ...), one thread,
and reports medians and ratios.  Results go to
``benchmarks/results/operators.{json,md,png}``.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from results_files import repeated_benchmark_arguments, save_figure, write_results
from torch import nn

from layerpipe.ops import NMSparseLinear, conv_transpose2d, parse_pattern
from layerpipe.ops.conv_transpose import _check, as_convolution_weight, multiply_counts, phase_forward


def median_times(variants: dict, repeats: int) -> dict[str, float]:
    """Return each variant's median time in seconds over ``repeats`` interleaved rounds (after one warm-up each)."""
    for run in variants.values():
        run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# ---------------------------------------------------------------- N:M sparsity
def sparse_row(width: int, pattern_text: str, tokens: int, repeats: int) -> dict:
    """Measure one layer size and pattern: bytes, multiplies and times of dense, gather and dense-kernel layers."""
    pattern = parse_pattern(pattern_text)
    torch.manual_seed(0)
    dense = nn.Linear(width, width)
    layers = {
        "dense BLAS": dense,
        "gather": NMSparseLinear.from_dense(dense, pattern),
        "dense kernel": NMSparseLinear.from_dense(dense, pattern, kernel="dense"),
    }
    inputs = torch.randn(tokens, width)
    grad = torch.randn(tokens, width)

    def forward(layer):
        def run():
            with torch.no_grad():
                layer(inputs)

        return run

    def training(layer):
        leaf = inputs.clone().requires_grad_()

        def run():
            layer.zero_grad(set_to_none=True)
            layer(leaf).backward(grad)

        return run

    forward_times = median_times({name: forward(layer) for name, layer in layers.items()}, repeats)
    training_times = median_times({name: training(layer) for name, layer in layers.items()}, repeats)
    kept = width * width * pattern.n // pattern.m
    return {
        "width": width,
        "pattern": str(pattern),
        "tokens": tokens,
        "dense_bytes": width * width * 4,
        "stored_bytes": kept * 5,
        "packed_bytes": kept * 4 + math.ceil(kept * math.ceil(math.log2(pattern.m)) / 8),
        "dense_multiplies": tokens * width * width,
        "sparse_multiplies": tokens * kept,
        "forward": forward_times,
        "forward_backward": training_times,
    }


def semi_structured_row(width: int, tokens: int, repeats: int) -> dict | None:
    """On CUDA: 2:4 fp16 inference through PyTorch's semi-structured kernels against dense fp16; else ``None``."""
    if not torch.cuda.is_available() or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return None
    torch.manual_seed(0)
    dense = nn.Linear(width, width).half().cuda()
    sparse = NMSparseLinear.from_dense(dense, "2:4")
    inputs = torch.randn(tokens, width, dtype=torch.float16, device="cuda")

    def timed(layer):
        def run():
            with torch.no_grad():
                layer(inputs)
            torch.cuda.synchronize()

        return run

    return {
        "width": width,
        "tokens": tokens,
        "times": median_times({"dense fp16": timed(dense), "2:4 semi-structured": timed(sparse)}, repeats),
    }


# ---------------------------------------------------------------- transposed convolution
def zero_insertion(inputs, weight, bias, stride, padding, output_padding):
    """The transposed convolution by zero insertion: spread the input, pad, convolve with the flipped kernel."""
    batch, channels, height, width = inputs.shape
    spread = inputs.new_zeros(batch, channels, (height - 1) * stride + 1, (width - 1) * stride + 1)
    spread[:, :, ::stride, ::stride] = inputs
    kernel = weight.shape[2]
    edge = kernel - 1 - padding
    padded = F.pad(spread, (edge, edge + output_padding, edge, edge + output_padding))
    return F.conv2d(padded, as_convolution_weight(weight, 1).flip(2, 3), bias)


def phases_by_autograd(inputs, weight, bias, stride, padding, output_padding):
    """The phase method with autograd through its phase convolutions instead of the adjoint backward."""
    strides, paddings, dilations, sizes = _check(inputs, weight, bias, stride, padding, output_padding, 1, 1, 2)
    return phase_forward(inputs, weight, strides, paddings, dilations, 1, sizes)


def conv_row(size: int, stride: int, kernel: int, repeats: int, channels: int = 32, batch: int = 4) -> dict:
    """Measure one transposed convolution: multiplies and the times of phases, zero insertion and PyTorch."""
    # kernel 2·stride, padding stride/2: the usual learned upsampling; kernel 3, padding 1, output padding
    # stride - 1: an output exactly stride times the input
    padding, output_padding = (stride // 2, 0) if kernel == 2 * stride else (1, stride - 1)
    torch.manual_seed(0)
    inputs = torch.randn(batch, channels, size, size)
    weight = torch.randn(channels, channels, kernel, kernel) / (channels * kernel)
    arguments = (stride, padding, output_padding)
    expected = F.conv_transpose2d(inputs, weight, None, *arguments)
    for found in (
        conv_transpose2d(inputs, weight, None, *arguments),
        zero_insertion(inputs, weight, None, *arguments),
        phases_by_autograd(inputs, weight, None, *arguments),
    ):
        assert (found - expected).abs().max() <= 1e-4 * expected.abs().max(), "the methods disagree"
    methods = {
        "phases (layerpipe)": conv_transpose2d,
        "phases, autograd backward": phases_by_autograd,
        "zero insertion": zero_insertion,
        "PyTorch": F.conv_transpose2d,
    }
    grad = torch.randn_like(expected)

    def forward(method):
        def run():
            with torch.no_grad():
                method(inputs, weight, None, *arguments)

        return run

    def training(method):
        leaf, kernel_leaf = inputs.clone().requires_grad_(), weight.clone().requires_grad_()

        def run():
            out = method(leaf, kernel_leaf, None, *arguments)
            torch.autograd.grad(out, (leaf, kernel_leaf), grad)

        return run

    counts = multiply_counts(inputs.shape, weight.shape, stride, padding, output_padding)
    return {
        "size": size,
        "stride": stride,
        "kernel": kernel,
        "padding": padding,
        "output_padding": output_padding,
        "multiplies": counts,
        "forward": median_times({name: forward(method) for name, method in methods.items()}, repeats),
        "forward_backward": median_times({name: training(method) for name, method in methods.items()}, repeats),
    }


# ---------------------------------------------------------------- report
def sparse_lines(rows: list[dict]) -> list[str]:
    lines = [
        "## N:M sparse linear layers",
        "",
        "| width | pattern | weight bytes: dense / stored / packed | multiplies (sparse ÷ dense) | "
        "forward ms: dense BLAS / gather / dense kernel | forward + backward ms: dense BLAS / gather / "
        "dense kernel |",
        "| ---: | --- | --- | ---: | --- | --- |",
    ]
    for row in rows:
        f, b = row["forward"], row["forward_backward"]
        lines.append(
            f"| {row['width']} | {row['pattern']} | {row['dense_bytes'] / 1024:.0f} / "
            f"{row['stored_bytes'] / 1024:.0f} / {row['packed_bytes'] / 1024:.0f} KiB | "
            f"{row['sparse_multiplies'] / row['dense_multiplies']:.3f} | "
            f"{1e3 * f['dense BLAS']:.2f} / {1e3 * f['gather']:.2f} / {1e3 * f['dense kernel']:.2f} | "
            f"{1e3 * b['dense BLAS']:.2f} / {1e3 * b['gather']:.2f} / {1e3 * b['dense kernel']:.2f} |"
        )
    return lines


def conv_lines(rows: list[dict]) -> list[str]:
    lines = [
        "## Transposed convolution",
        "",
        "| input | stride | kernel | multiplies: phases / zero insertion / useful (M) | "
        "forward ms: phases / zero insertion / PyTorch | forward + backward ms: phases / zero insertion / "
        "PyTorch | forward + backward ms, phases with autograd's backward |",
        "| ---: | ---: | ---: | --- | --- | --- | ---: |",
    ]
    names = ("phases (layerpipe)", "zero insertion", "PyTorch")
    for row in rows:
        counts = row["multiplies"]
        lines.append(
            f"| {row['size']}² | {row['stride']} | {row['kernel']} | {counts['phases'] / 1e6:.1f} / "
            f"{counts['zero_insertion'] / 1e6:.1f} / {counts['useful'] / 1e6:.1f} | "
            + " / ".join(f"{1e3 * row['forward'][name]:.2f}" for name in names)
            + " | "
            + " / ".join(f"{1e3 * row['forward_backward'][name]:.2f}" for name in names)
            + " | "
            f"{1e3 * row['forward_backward']['phases, autograd backward']:.2f} |"
        )
    return lines


def ratio_bars(axes, rows: list[dict], labels: list[str], names: tuple[str, str], baseline: str, title: str) -> None:
    """Draw, per row, two bars: the forward + backward time of ``names`` divided by ``baseline``'s (log scale)."""
    for offset, name in zip((-0.2, 0.2), names):
        axes.bar(
            [i + offset for i in range(len(rows))],
            [row["forward_backward"][name] / row["forward_backward"][baseline] for row in rows],
            width=0.4,
            label=name,
        )
    axes.axhline(1, color="black", linewidth=0.8)
    axes.set_xticks(range(len(rows)), labels, fontsize=6)
    axes.set_yscale("log")
    axes.set_ylabel(f"forward + backward time ÷ {baseline}")
    axes.set_title(title)
    axes.legend()


def draw(sparse_rows: list[dict], conv_rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    ratio_bars(
        left,
        sparse_rows,
        [f"{row['width']}\n{row['pattern']}" for row in sparse_rows],
        ("gather", "dense kernel"),
        "dense BLAS",
        "N:M sparse linear on this CPU",
    )
    ratio_bars(
        right,
        conv_rows,
        [f"{row['size']}²\ns{row['stride']} k{row['kernel']}" for row in conv_rows],
        ("phases (layerpipe)", "zero insertion"),
        "PyTorch",
        "transposed convolution on this CPU",
    )
    save_figure(figure, path)


def main() -> None:
    args = repeated_benchmark_arguments(__doc__, "one small size of each (for a test of the script)")
    torch.set_num_threads(1)
    widths, sizes = ((256,), (16,)) if args.quick else ((256, 512, 1024), (16, 32, 64))
    patterns = ("2:4",) if args.quick else ("2:4", "1:4", "4:8")
    sparse_rows = [sparse_row(width, pattern, 1024, args.repeats) for width in widths for pattern in patterns]
    gpu_rows = [row for row in (semi_structured_row(width, 1024, args.repeats) for width in widths) if row]
    conv_rows = [
        conv_row(size, stride, kernel, args.repeats)
        for size in sizes
        for stride in range(1, 5)
        for kernel in sorted({2 * stride, 3})
    ]
    draw(sparse_rows, conv_rows, os.path.join(args.output, "operators.png"))
    today = datetime.date.today().isoformat()
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, one thread), torch {torch.__version__}"
    lines = [
        f"# Operators: N:M sparsity and transposed convolution ({today})",
        "",
        f"Machine: {machine}. Medians of {args.repeats} interleaved repetitions.",
        "",
        "![operators](operators.png)",
        "",
        *sparse_lines(sparse_rows),
        "",
        (
            "GPU (2:4 fp16 inference, semi-structured): "
            + "; ".join(
                f"width {row['width']}: dense {1e3 * row['times']['dense fp16']:.3f} ms, semi-structured "
                f"{1e3 * row['times']['2:4 semi-structured']:.3f} ms"
                for row in gpu_rows
            )
        )
        if gpu_rows
        else "GPU: none on this machine, so no semi-structured timing.",
        "",
        *conv_lines(conv_rows),
    ]
    record = {
        "date": today,
        "machine": machine,
        "repeats": args.repeats,
        "sparse": sparse_rows,
        "gpu": gpu_rows,
        "conv_transpose": conv_rows,
    }
    print(write_results(args.output, "operators", record, lines))


if __name__ == "__main__":
    main()
