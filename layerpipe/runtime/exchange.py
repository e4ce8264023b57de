"""Exchanging small Python values between processes as JSON in tensors, not pickles.

``torch.distributed.all_gather_object`` pickles what it sends, and a
process that unpickles what a peer sent runs whatever the peer put there.
``all_gather_json`` sends JSON text as bytes in a tensor instead: the
lengths first, then the texts padded to the longest.  Values must be what
JSON holds (dicts with string keys, lists, numbers, strings, booleans, None).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist


def all_gather_json(value, group=None, device: torch.device | str = "cpu") -> list:
    """Return every process's ``value`` of ``group`` (all processes by default), in rank order (collective)."""
    size = dist.get_world_size(group)
    if size == 1:
        return [json.loads(json.dumps(value))]
    data = torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    longest = int(max(int(found) for found in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    texts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(texts, padded, group=group)
    return [json.loads(bytes(text[: int(found)].cpu().tolist()).decode("utf-8")) for text, found in zip(texts, lengths)]
