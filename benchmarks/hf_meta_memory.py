"""How much memory each process of a meta-built Hugging Face Llama holds: about its own half, not the whole model.

    python benchmarks/hf_meta_memory.py [--width 1024] [--layers 24] [--vocabulary 32000]

A float32 Llama of 1.9 GB (width 1024, 24 decoder layers, MLP 4096, a
vocabulary of 32000) is built on the meta device in each of 2 gloo
processes, split with ``layerpipe.hf.split`` and handed to a 1F1B
``Pipeline``, which materialises only the process's stages; one evaluation
step runs on a batch of one row of 32 tokens.  Each process reports its
peak resident memory (``ru_maxrss``) before building (torch and
transformers imported), after the pipeline is built and after the step,
beside the bytes of the whole model and of its own stages.  One run: the
figure measured is a peak, not a time.  Results with machine and date go to
``benchmarks/results/hf_meta_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_files import gloo_machine, write_results

GIB = 2**30


def peak_bytes() -> int:
    """Return this process's peak resident memory so far, in bytes (Linux gives ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    """Return this process's resident memory now, in bytes (from ``/proc/self/statm``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(width: int, layers: int, vocabulary: int, build: str) -> dict:
    """Worker: build the Llama (on the meta device, or whole as before), run one evaluation step; return the
    process's memory figures."""
    import torch
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported before the baseline is read)

    import layerpipe
    from layerpipe import hf

    torch.set_num_threads(1)
    before = peak_bytes()
    config = transformers.LlamaConfig(
        vocab_size=vocabulary,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        use_cache=False,
    )
    with torch.device("meta" if build == "meta" else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    split = hf.split(model)
    pipe = layerpipe.Pipeline(split, hf.causal_lm_loss, schedule="1f1b", microbatches=1, timeout=1200, seed=0)
    built = peak_bytes()
    ids = torch.randint(0, vocabulary, (1, 32), generator=torch.Generator().manual_seed(0))
    loss = pipe.eval_step(ids, ids)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    own_bytes = sum(p.numel() * p.element_size() for stage in pipe.stages.values() for p in stage.parameters())
    return {
        "rank": pipe.rank,
        "layers": [list(boundary) for boundary in pipe.boundaries],
        "model_bytes": model_bytes,
        "own_stage_bytes": own_bytes,
        "peak_before_build_bytes": before,
        "peak_after_build_bytes": built,
        "peak_after_step_bytes": peak_bytes(),
        "resident_after_step_bytes": resident_bytes(),
        "loss": loss,
    }


def main() -> None:
    import layerpipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocabulary", type=int, default=32000)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    runs = {
        build: layerpipe.launch(measure, 2, (args.width, args.layers, args.vocabulary, build), timeout=1800)
        for build in BUILDS
    }
    record = {
        "machine": gloo_machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {"width": args.width, "layers": args.layers, "mlp": 4 * args.width, "vocabulary": args.vocabulary},
        "runs": runs,
    }
    print(write_results(args.output, "hf_meta_memory", record, table(record, args)))


BUILDS = {
    "meta": "built on the meta device, each process materialising its own stages",
    "full": "built whole in every process (as before), each keeping its own stages",
}


def table(record: dict, args) -> list[str]:
    """Return the Markdown lines of the results: one row per build and process."""
    model = record["runs"]["meta"][0]["model_bytes"]
    lines = [
        f"# Meta-built Llama on 2 processes: peak resident memory ({record['date']}, {record['machine']})",
        "",
        f"float32 Llama, width {args.width}, {args.layers} decoder layers, MLP {4 * args.width}, vocabulary "
        f"{args.vocabulary}: the whole model is {model / GIB:.2f} GiB. One 1F1B evaluation step, 1 row × 32 tokens; "
        f"a stage makes its gradient buffer at its first backward, so an evaluation holds none. "
        f"Builds: " + "; ".join(f"{name}: {text}" for name, text in BUILDS.items()) + ".",
        "",
        "| build | process | layers | own stages | peak before build | peak after step | resident after step "
        "| peak − before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for build, rows in record["runs"].items():
        for row in rows:
            grown = row["peak_after_step_bytes"] - row["peak_before_build_bytes"]
            lines.append(
                f"| {build} | {row['rank']} | {row['layers'][row['rank']]} | {row['own_stage_bytes'] / GIB:.2f} GiB "
                f"({row['own_stage_bytes'] / model:.0%}) | {row['peak_before_build_bytes'] / GIB:.2f} GiB | "
                f"{row['peak_after_step_bytes'] / GIB:.2f} GiB | {row['resident_after_step_bytes'] / GIB:.2f} GiB | "
                f"{grown / GIB:.2f} GiB ({grown / model:.0%} of the model) |"
            )
    return lines


if __name__ == "__main__":
    main()
