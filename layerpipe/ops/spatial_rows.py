"""Row arithmetic of spatially partitioned layers: who owns which rows, which rows a layer needs, who sends what.

An image of ``height`` rows is split along its height into chunks, one
per spatial rank: rank ``i`` holds rows ``bounds[i] = (first, end)``.  A
layer's output rows are split the same way (``output_bounds``), and each
rank computes its own output rows from the input rows they need
(``needed_rows``): its own, plus the *overlap* held by its neighbours,
plus rows outside the image that the layer pads (zeros, or the rows at the
other edge when it pads circularly).  ``plan_exchange`` turns that into one
rank's sends and receives, so every rank can work out the same exchange
without asking.  Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

Bounds = tuple[tuple[int, int], ...]
"""Each spatial rank's rows ``(first, end)``, in spatial-rank order, together covering ``0 … height``."""


def split_rows(height: int, parts: int, align: int = 1) -> Bounds:
    """Return ``parts`` chunks of ``height`` rows as even as can be, each starting on a multiple of ``align``.

    Refuses (``ValueError``) more parts than there are aligned blocks of rows.
    """
    blocks = -(-height // align)
    if parts < 1 or parts > blocks:
        raise ValueError(
            f"cannot split {height} rows into {parts} chunks starting on multiples of {align}: at most {blocks} chunks"
        )
    edges = [min(height, (blocks * part // parts) * align) for part in range(parts + 1)]
    return tuple(zip(edges, edges[1:]))


def check_bounds(bounds: Bounds, height: int) -> None:
    """Refuse, with ``ValueError``, chunks that are empty or do not cover ``0 … height`` in order."""
    if (
        not bounds
        or bounds[0][0] != 0
        or bounds[-1][1] != height
        or any(first >= end for first, end in bounds)
        or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:]))
    ):
        raise ValueError(f"spatial chunks {list(bounds)} must be non-empty and cover rows 0 to {height} in order")


@dataclass(frozen=True)
class RowMap:
    """How one layer maps rows along the split dimension: a convolution or a transposed convolution.

    ``kind`` is ``"conv"`` or ``"transposed"``; ``kernel``, ``stride``,
    ``padding``, ``dilation`` (and ``output_padding`` for a transposed
    convolution) are the layer's along that dimension.  An element-wise
    layer is a convolution of kernel 1.
    """

    kind: str = "conv"
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    output_padding: int = 0

    def output_height(self, height: int) -> int:
        """Return the layer's output rows for ``height`` input rows."""
        reach = self.dilation * (self.kernel - 1)
        if self.kind == "transposed":
            return (height - 1) * self.stride - 2 * self.padding + reach + self.output_padding + 1
        return (height + 2 * self.padding - reach - 1) // self.stride + 1

    def needed_rows(self, first: int, end: int, height: int) -> tuple[int, int]:
        """Return the input rows ``(first, end)`` that output rows ``first … end`` need.

        For a convolution they may reach below 0 or past ``height`` (the
        padding); for a transposed convolution they are clipped to the image,
        since rows outside it contribute nothing.
        """
        reach = self.dilation * (self.kernel - 1)
        if self.kind == "transposed":
            low = min(height, max(0, -(-(first + self.padding - reach) // self.stride)))
            high = (end - 1 + self.padding) // self.stride + 1
            return low, max(low, min(height, high))
        return first * self.stride - self.padding, (end - 1) * self.stride - self.padding + reach + 1

    def output_bounds(self, bounds: Bounds, height: int) -> Bounds:
        """Return each rank's output rows: those whose inputs are centred in its input rows.

        Output ``o`` of a convolution reads input rows centred on
        ``o · stride - padding + reach // 2`` (``reach = dilation · (kernel - 1)``);
        a transposed convolution's output ``o`` is centred on input row
        ``(o + padding - reach // 2) / stride``.  The first rank's rows start
        at 0, the last one's end at the output's end.  Refuses
        (``ValueError``) a split that leaves a rank no output row.
        """
        total, centre = self.output_height(height), self.dilation * (self.kernel - 1) // 2
        edges = [0]
        for first, _ in bounds[1:]:
            edge = (
                first * self.stride - self.padding + centre
                if self.kind == "transposed"
                else -(-(first + self.padding - centre) // self.stride)
            )
            edges.append(min(total, max(0, edge)))
        edges.append(total)
        result = tuple(zip(edges, edges[1:]))
        if any(first >= end for first, end in result):
            raise ValueError(
                f"the spatial chunks {list(bounds)} of {height} rows leave a rank no output row of this "
                f"layer ({total} rows): use fewer spatial ranks or a larger image"
            )
        return result


@dataclass(frozen=True)
class Piece:
    """Rows ``first … end`` of the sender's chunk (its local numbering) that land at ``at`` in the receiver's rows."""

    peer: int
    first: int
    end: int
    at: int


@dataclass(frozen=True)
class ExchangePlan:
    """One rank's part of an overlap exchange: which rows it assembles from where.

    ``rows`` is how many rows the assembled input has; ``copies`` are its
    own rows (``peer`` is itself), ``receives`` come from other ranks,
    ``sends`` go to them (``at`` is where they land in the peer's
    assembled rows); rows no piece covers are zeros (padding).
    """

    rows: int
    copies: tuple[Piece, ...]
    receives: tuple[Piece, ...]
    sends: tuple[Piece, ...]


def _pieces_for(want: tuple[int, int], bounds: Bounds, height: int, circular: bool) -> list[tuple[int, int, int, int]]:
    """Return ``(owner, local first, local end, at)`` for each stretch of the wanted rows some rank holds."""
    low, high = want
    pieces = []
    for shift in (-height, 0, height) if circular else (0,):
        for owner, (first, end) in enumerate(bounds):
            start, stop = max(low, first + shift), min(high, end + shift)
            if start < stop:
                pieces.append((owner, start - shift - first, stop - shift - first, start - low))
    return sorted(pieces, key=lambda piece: piece[3])


def plan_exchange(
    bounds: Bounds, wants: tuple[tuple[int, int], ...], height: int, index: int, circular: bool = False
) -> ExchangePlan:
    """Return rank ``index``'s exchange, where rank ``j`` wants input rows ``wants[j]`` (image rows, may overhang).

    Refuses (``ValueError``) an exchange that needs rows of a rank other than
    a neighbour (with circular padding, the first and last ranks are
    neighbours): a chunk smaller than the overlap it must provide.
    """
    ranks = len(bounds)

    def check(receiver: int, owner: int) -> None:
        if abs(owner - receiver) > 1 and not (circular and {owner, receiver} == {0, ranks - 1}):
            first, end = bounds[receiver - 1 if owner < receiver else receiver + 1]
            raise ValueError(
                f"spatial rank {receiver} needs rows {wants[receiver][0]} to {wants[receiver][1] - 1} "
                f"(its overlap), which reach past its neighbour's chunk of {end - first} rows into "
                f"spatial rank {owner}'s: use fewer spatial ranks or a larger image"
            )

    pieces = {receiver: _pieces_for(wants[receiver], bounds, height, circular) for receiver in range(ranks)}
    for receiver, found in pieces.items():  # every rank refuses the same split, so none waits for another
        for owner, *_ in found:
            check(receiver, owner)
    copies, receives, sends = [], [], []
    for owner, first, end, at in pieces[index]:
        (copies if owner == index else receives).append(Piece(owner, first, end, at))
    for receiver in range(ranks):
        if receiver != index:
            sends += [Piece(receiver, first, end, at) for owner, first, end, at in pieces[receiver] if owner == index]
    return ExchangePlan(wants[index][1] - wants[index][0], tuple(copies), tuple(receives), tuple(sends))
