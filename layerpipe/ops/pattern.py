"""An N:M sparsity pattern and its spelling ``"N:M"`` (no torch here: the command line checks it)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..knobs import ConfigError

SPARSE_KERNELS = ("gather", "dense")
"""How ``NMSparseLinear`` multiplies: by the metadata-driven gather, or by decompressing and calling dense BLAS."""

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """At most ``n`` non-zeros in every group of ``m`` consecutive inputs."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def terms(self) -> int:
        """How many N:M matrices a dense matrix needs to be their exact sum."""
        return math.ceil(self.m / self.n)


def parse_pattern(text: str | Pattern, field: str = "pattern") -> Pattern:
    """Return the pattern ``"N:M"`` names; refuse (``ConfigError`` naming ``field``) anything but 1 ≤ N < M ≤ 64."""
    if isinstance(text, Pattern):
        return text
    match = _PATTERN.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(field, text, "must be N:M, at most N non-zeros in every M inputs, e.g. 2:4, 1:4 or 4:8")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m <= 64:
        raise ConfigError(field, text, "needs 1 <= N < M <= 64 (N:M keeps N of every M inputs), e.g. 2:4, 1:4 or 4:8")
    return Pattern(n, m)


def nm_pattern(value) -> str | None:
    """A knob's validity rule: ``None`` (dense) or a pattern ``parse_pattern`` accepts."""
    if value is None:
        return None
    try:
        parse_pattern(value)
    except ConfigError as error:
        return error.valid
    return None
