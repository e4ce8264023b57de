"""N:M structured sparsity: the pattern, magnitude pruning, the compressed form and exact decomposition.

A weight of shape ``(out_features, in_features)`` is N:M sparse when every
group of M consecutive inputs of every row holds at most N non-zeros.  Its
compressed form keeps, per row and group, N values and N small offsets
(0 … M-1) that say which input of the group each value multiplies — the
per-value index metadata an accelerator's load unit reads to fetch the
right input.  Values are kept in input order within a group.

A dense matrix is an exact sum of ``ceil(M / N)`` N:M matrices (and no
fewer, since a group with M non-zeros needs that many): term ``t`` keeps
the inputs ``t·N … t·N + N - 1`` of each group.
"""

from __future__ import annotations

import torch

from .pattern import Pattern, parse_pattern  # noqa: F401 - part of this module's interface


def check_fits(in_features: int, pattern: Pattern, what: str = "the weight") -> None:
    """Refuse, in one line, an input size that is not a whole number of groups of ``pattern.m``."""
    if in_features % pattern.m:
        raise ValueError(
            f"{what} has {in_features} inputs, not a multiple of M = {pattern.m} for the {pattern} "
            f"pattern: choose a pattern whose M divides {in_features}, or leave this layer dense"
        )


def nm_offsets(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Return, for each row and group of ``weight``, the offsets (0 … M-1, ascending) of its N largest magnitudes.

    Shape ``(out_features, in_features // M, N)``, dtype uint8.  Ties go to
    the lower input index, so the choice is deterministic.
    """
    check_fits(weight.shape[-1], pattern)
    groups = weight.detach().abs().reshape(weight.shape[0], -1, pattern.m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    return order[..., : pattern.n].sort(dim=-1).values.to(torch.uint8)


def columns_of(offsets: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Return the input index each kept value multiplies: shape ``(out_features, in_features // M * N)``, int64."""
    groups = torch.arange(offsets.shape[1], device=offsets.device).view(1, -1, 1) * pattern.m
    return (groups + offsets.long()).reshape(offsets.shape[0], -1)


def compress(weight: torch.Tensor, pattern: Pattern, offsets: torch.Tensor | None = None):
    """Return ``(values, offsets)``: ``weight``'s kept values and their offsets, pruned by magnitude unless given.

    ``values`` has shape ``(out_features, in_features // M * N)``.
    """
    offsets = nm_offsets(weight, pattern) if offsets is None else offsets
    return weight.gather(1, columns_of(offsets, pattern)), offsets


def decompress(values: torch.Tensor, offsets: torch.Tensor, pattern: Pattern, in_features: int) -> torch.Tensor:
    """Return the dense ``(out_features, in_features)`` weight that ``values`` and ``offsets`` describe (exact)."""
    dense = values.new_zeros(values.shape[0], in_features)
    return dense.scatter(1, columns_of(offsets, pattern), values)


def nm_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Return the boolean mask of the weights that magnitude N:M pruning keeps."""
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    return mask.scatter(1, columns_of(nm_offsets(weight, pattern), pattern), True)


def prune(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Return ``weight`` with all but the N largest magnitudes of every group of M inputs set to zero."""
    return weight * nm_mask(weight, pattern)


def decompose(weight: torch.Tensor, pattern: Pattern) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return ``pattern.terms`` compressed N:M matrices ``(values, offsets)`` whose sum is ``weight``, exactly.

    Term ``t`` holds inputs ``t·N … t·N + N - 1`` of every group; the last
    term of a pattern where N does not divide M repeats earlier offsets with
    value zero, so every term has the same shape.
    """
    check_fits(weight.shape[-1], pattern)
    out_features, groups = weight.shape[0], weight.shape[1] // pattern.m
    terms = []
    for term in range(pattern.terms):
        wanted = torch.arange(term * pattern.n, term * pattern.n + pattern.n)
        real = wanted < pattern.m
        within = torch.where(real, wanted, wanted - pattern.n)  # a repeated slot, its value zeroed below
        offsets = within.to(torch.uint8).to(weight.device).expand(out_features, groups, pattern.n).contiguous()
        values, _ = compress(weight, pattern, offsets)
        values = values.view(out_features, groups, pattern.n) * real.to(weight.device)
        terms.append((values.reshape(out_features, -1), offsets))
    return terms


# ---------------------------------------------------------------- PyTorch's 2:4 layout
def semi_structured_metadata(offsets: torch.Tensor) -> torch.Tensor:
    """Return 2:4 ``offsets`` as the int16 metadata of PyTorch's CUTLASS 2:4 layout for 16-bit weights.

    Each group's two 2-bit offsets make 4 bits (lower offset in the low
    bits), four groups make one int16, and the words are placed in the
    interleaved order CUTLASS reads (PyTorch's own reordering, from
    ``torch.sparse._semi_structured_conversions``).  Refuses shapes that
    layout cannot hold: rows a multiple of 32, inputs of 16.
    """
    from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets

    rows, groups, kept = offsets.shape
    if kept != 2 or rows % 32 or groups % 4:
        raise ValueError(
            f"PyTorch's 2:4 layout needs the 2:4 pattern, rows a multiple of 32 and inputs a multiple "
            f"of 16; got offsets of shape {tuple(offsets.shape)}"
        )
    nibbles = (offsets[..., 0].long() | (offsets[..., 1].long() << 2)).to(torch.int16).view(rows, groups // 4, 4)
    words = nibbles[..., 0] | (nibbles[..., 1] << 4) | (nibbles[..., 2] << 8) | (nibbles[..., 3] << 12)
    scatter = _calculate_meta_reordering_scatter_offsets(rows, groups // 4, torch.int16, offsets.device)
    return words.new_empty(rows * (groups // 4)).scatter_(0, scatter, words.view(-1)).view(rows, groups // 4)
