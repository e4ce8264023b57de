"""What ``layerpipe.hf`` pays for building the rotary embedding and the attention mask in every decoder layer.

    python benchmarks/hf_rotary_cost.py [--width 1024] [--time 512] [--batch 2]

One Llama decoder layer (float32, one thread, sdpa, a left-padded batch):
the time of its rotary embedding and of its 4-D mask beside the time of
the whole layer, medians of repeated runs; and the bytes the other way
would send at every cut (cos and sin, float, so a gradient comes back too)
beside the hidden state and the bool mask that travel anyway.  Printed,
not stored: the decision it supports is in ``docs/hf.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_seconds(call, repeats: int = 7) -> float:
    """Return the median wall time of ``call()`` over ``repeats`` runs, after one warm-up."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import transformers

    from layerpipe import hf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--time", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    width, steps, batch = arguments.width, arguments.time, arguments.batch
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=width * 11 // 4,
        num_hidden_layers=1,
        num_attention_heads=width // 64,
        max_position_embeddings=steps,
        use_cache=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    decoder = hf.split(model)[1]
    hidden = torch.randn(batch, steps, width)
    mask = torch.ones(batch, steps, dtype=torch.bool)
    mask[-1, : steps // 4] = False
    positions = torch.arange(steps).unsqueeze(0)
    with torch.no_grad():
        rotary = median_seconds(lambda: model.model.rotary_emb(hidden, positions))
        masks = median_seconds(lambda: hf._attention_mask(config, "full_attention", hidden, mask, positions))
        layer = median_seconds(lambda: decoder(hidden, mask))
    cos, sin = model.model.rotary_emb(hidden, positions)
    sent = cos.numel() * cos.element_size() + sin.numel() * sin.element_size()
    print(f"decoder layer width {width}, {steps} tokens × {batch}: {layer * 1e3:.1f} ms")
    print(
        f"  rotary embedding {rotary * 1e3:.3f} ms, attention mask {masks * 1e3:.3f} ms: {(rotary + masks) / layer:.2%}"
    )
    print(f"  cos and sin would send {sent} bytes a cut (and their gradient back) beside the hidden state's")
    print(f"  {hidden.numel() * hidden.element_size()} and the bool mask's {mask.numel()} bytes")


if __name__ == "__main__":
    main()
