"""One stage's parameters and gradients on one flat buffer, sharded over its data-parallel replicas.

Every parameter of the stage becomes a view into one flat parameter buffer
and its ``.grad`` a view into one flat gradient buffer, both padded to a
multiple of the replica count ``d``; replica ``j`` owns elements
``[j·S, (j+1)·S)`` (``S`` = padded length / ``d``).  The ZeRO level decides
what each replica keeps and which collective a ``GATHER`` or ``REDUCE``
action issues:

====  ==================================  ====================  ===============================
zero  optimizer steps                     ``REDUCE``            ``GATHER``
====  ==================================  ====================  ===============================
0     the stage's parameters              all-reduce            —
1     its shard (a view of the buffer)    all-reduce            all-gather after the step
2     its shard (a view of the buffer)    reduce-scatter        all-gather after the step
3     its shard (stored apart)            reduce-scatter        all-gather before use
====  ==================================  ====================  ===============================

At ZeRO-3 the flat parameter buffer's storage is emptied on ``RELEASE`` and
refilled on ``GATHER``; the parameters (and the tensors autograd saved from
them) are views of that storage, so they see the gathered values again
without being rebuilt.  At ZeRO-2 and 3 the flat gradient buffer is emptied
once its shard has been reduced.  All collectives are issued with
``async_op=True`` and return the work to wait on.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .p2p import wait_for
from .stage import PipelineError, Stage


def _portion(length: int, portion: int, portions: int) -> tuple[int, int]:
    """Return the bounds of 1-based ``portion`` of ``portions`` near-equal parts of ``range(length)``."""
    return (portion - 1) * length // portions, portion * length // portions


class StageShard:
    """The flat buffers of one local stage and the collectives that keep them consistent across replicas."""

    def __init__(
        self, stage: Stage, zero: int, replicas: int, replica: int, group, device: torch.device, uncounted=frozenset()
    ):
        self.stage_index = stage.index
        self.zero = zero if replicas > 1 else 0  # one replica: nothing to shard, the full buffer is its own shard
        self.replicas = replicas
        self.replica = replica
        self.group = group
        named = [(name, p) for name, p in stage.named_model_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        dtypes = {p.dtype for p in self.parameters}
        if len(dtypes) > 1:
            raise PipelineError(
                f"stage {stage.index} holds parameters of several dtypes "
                f"({', '.join(sorted(str(d) for d in dtypes))}): sharded data parallelism keeps "
                f"one flat buffer per stage and needs one dtype"
            )
        dtype = dtypes.pop() if dtypes else torch.float32
        self.spans: list[tuple[int, int]] = []  # where each parameter lies in the flat buffers
        for parameter in self.parameters:
            start = self.spans[-1][1] if self.spans else 0
            self.spans.append((start, start + parameter.numel()))
        self.length = self.spans[-1][1] if self.spans else 0
        # the flat ranges of copies of tied parameters that the global norm counts on another stage
        self.uncounted = sorted(span for name, span in zip(self.names, self.spans) if name in uncounted)
        self.shard_size = -(-self.length // replicas)
        low, high = replica * self.shard_size, (replica + 1) * self.shard_size
        self.shard_bounds = (low, high)
        padded = self.shard_size * replicas
        # Filled parameter by parameter, each one's own storage freed as it moves in, the gradient buffer made after:
        # a stage holds its parameters once (not twice, nor three times) at its peak while it is built.
        self.flat = torch.empty(padded, dtype=dtype, device=device)
        self.flat[self.length :].zero_()
        for parameter, (start, end) in zip(self.parameters, self.spans):
            self.flat[start:end].copy_(parameter.detach().reshape(-1))
            parameter.data = self.flat[start:end].view_as(parameter)
        # made (zeroed) at the stage's first backward, ``ensure_gradients``: a pipeline that only evaluates, and every
        # stage until its first backward, holds no gradient buffer.  It is sized here and emptied at once: on CPU its
        # untouched pages never become resident; CUDA's caching allocator keeps the block for the first backward.
        self.flat_grad = torch.empty(padded, dtype=dtype, device=device)
        self.flat_grad.untyped_storage().resize_(0)
        if self.zero == 0:
            self.optimized = list(self.parameters)
        else:
            data = self.flat[low:high].clone() if self.zero == 3 else self.flat[low:high]
            shard = nn.Parameter(data)
            shard.grad = None if self.zero == 1 else torch.zeros_like(data)  # ZeRO-1: a view of the buffer, once made
            self.optimized = [shard]
        self.shard = self.optimized[0] if self.zero else None
        self.gathered = True
        if self.zero == 3:
            self.release()
        self.reduced()

    # ---------------------------------------------------------------- per step
    def begin_step(self) -> None:
        """Zero the gradient buffer for a new step and point every ``.grad`` into it again.

        Re-pointing undoes an ``optimizer.zero_grad()`` (which sets ``.grad``
        to ``None``) between steps.  At ZeRO-2/3 the buffer is emptied after
        each reduce and refilled, zeroed, at the stage's first backward.
        """
        if self.has_gradients:
            self.flat_grad.zero_()
            self._attach_gradients()

    @property
    def has_gradients(self) -> bool:
        """Return whether the full gradient buffer is allocated (below ZeRO-2: from the stage's first backward on)."""
        return self.flat_grad.untyped_storage().nbytes() > 0 or self.flat_grad.numel() == 0

    def ensure_gradients(self) -> bool:
        """Make or refill the gradient buffer (first backward; ZeRO-2/3: after each reduce emptied it) before a backward
        accumulates into it; return whether it did."""
        if self.has_gradients:
            return False
        self.before_backward()
        return True

    def before_backward(self) -> None:
        """Refill the emptied gradient buffer with zeros before a backward accumulates into it (ZeRO-2/3)."""
        _allocate(self.flat_grad)
        self.flat_grad.zero_()
        self._attach_gradients()

    def _attach_gradients(self) -> None:
        for parameter, (start, end) in zip(self.parameters, self.spans):
            parameter.grad = self.flat_grad[start:end].view_as(parameter)
        if self.zero == 1:
            low, high = self.shard_bounds
            self.shard.grad = self.flat_grad[low:high]

    def gather(self):
        """Issue the all-gather of the replicas' shards into the full parameter buffer; return its work.

        At ZeRO-3 the buffer's storage is allocated first; at ZeRO-1/2 the
        shard is already in place (a view of the buffer).
        """
        if self.zero == 3:
            _allocate(self.flat)
            source = self.shard.detach()
        else:
            source = self.flat[self.shard_bounds[0] : self.shard_bounds[1]]
        self.gathered = True
        return all_gather_into(self.flat, source, self.group)

    def release(self) -> None:
        """Free the full parameter buffer's storage (ZeRO-3); the shard stays."""
        self.flat.untyped_storage().resize_(0)
        self.gathered = False

    def reduce(self, portion: int = 1, portions: int = 1):
        """Issue the reduction of one portion of the gradients (summed over replicas); return its work.

        All-reduce of a contiguous part of the buffer at ZeRO-0/1;
        reduce-scatter of the same part of every replica's shard into this
        replica's shard at ZeRO-2/3.  Returns ``None`` for an empty portion
        (every replica skips it alike).
        """
        if self.zero < 2:
            low, high = _portion(self.flat_grad.numel(), portion, portions)
            if low == high:
                return None
            return dist.all_reduce(self.flat_grad[low:high], group=self.group, async_op=True)
        if portions == 1:
            scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            return scatter(self.shard.grad, self.flat_grad, group=self.group, async_op=True)
        low, high = _portion(self.shard_size, portion, portions)
        if low == high:
            return None
        parts = [self.flat_grad[j * self.shard_size + low : j * self.shard_size + high] for j in range(self.replicas)]
        return dist.reduce_scatter(self.shard.grad[low:high], parts, group=self.group, async_op=True)

    def reduced(self) -> None:
        """After the last portion arrived: free the full gradient buffer at ZeRO-2/3 (only the shard is stepped).

        Until the stage's next backward refills it, the parameters' ``.grad`` is ``None``.
        """
        if self.zero >= 2:
            for parameter in self.parameters:
                parameter.grad = None
            self.flat_grad.untyped_storage().resize_(0)

    def gradients_finite(self) -> bool:
        """Return whether every gradient this replica's step would use is finite (the reduced ones, after ``REDUCE``)."""
        return all(
            bool(torch.isfinite(gradient).all()) for _, gradient in self.local_gradients() if gradient is not None
        )

    def counted_gradient(self) -> torch.Tensor:
        """Return the flat reduced gradient this replica counts in the global norm: its shard, so the replicas
        together count every element once (the shard's ``.grad`` at ZeRO-2/3; that part of the full buffer below)."""
        if self.zero >= 2:
            return self.shard.grad
        low, high = self.shard_bounds
        return self.flat_grad[low:high]

    def squared_norm(self) -> torch.Tensor:
        """Return the sum of the squares of ``counted_gradient`` as a float64 scalar on its device (not finite when
        a gradient is not), without the copies of tied parameters another stage counts (``uncounted``)."""
        gradient, low = self.counted_gradient(), self.shard_bounds[0]
        if not self.uncounted:
            return torch.linalg.vector_norm(gradient, dtype=torch.float64) ** 2
        total = torch.zeros((), dtype=torch.float64, device=gradient.device)
        for start, end in _counted_ranges(self.shard_bounds, self.uncounted):
            total += torch.linalg.vector_norm(gradient[start - low : end - low], dtype=torch.float64) ** 2
        return total

    def scale_gradients(self, factor: float) -> None:
        """Multiply the reduced gradients the step uses by ``factor`` (all of ``.grad`` below ZeRO-2, the shard's above)."""
        (self.shard.grad if self.zero >= 2 else self.flat_grad).mul_(factor)

    def shard_ranges(self):
        """Yield ``(name, start, end)``: the elements ``[start, end)`` of each flattened parameter in this replica's shard.

        ``start == end`` for a parameter wholly outside the shard.
        """
        for name, offset, start, end in self._clipped():
            yield name, start - offset, end - offset

    def local_parameters(self):
        """Yield ``(name, tensor)`` for what this replica stores of each parameter (see ``shard_ranges``).

        The parameters themselves below ZeRO-3; at ZeRO-3 flat views of the shard.
        """
        if self.zero != 3:
            yield from zip(self.names, self.parameters)
            return
        yield from self._shard_pieces(self.shard)

    def local_gradients(self):
        """Yield ``(name, tensor)``: the reduced gradient of what this replica steps of each parameter.

        The full ``.grad`` at ZeRO-0/1; at ZeRO-2/3 flat views of the shard's
        gradient, covering the elements ``shard_ranges`` names.
        """
        if self.zero < 2:
            yield from ((name, p.grad) for name, p in zip(self.names, self.parameters))
            return
        yield from self._shard_pieces(self.shard.grad)

    def _shard_pieces(self, shard: torch.Tensor):
        low = self.shard_bounds[0]
        for name, _, start, end in self._clipped():
            yield name, shard[start - low : end - low]

    def _clipped(self):
        """Yield ``(name, offset, start, end)``: each parameter's offset and its flat range clipped to the shard."""
        low, high = self.shard_bounds
        for name, (offset, stop) in zip(self.names, self.spans):
            start = max(offset, low)
            yield name, offset, start, max(start, min(stop, high))

    @property
    def weight_bytes(self) -> int:
        """Return the bytes of the stage's parameters (unpadded, one full copy)."""
        return self.length * self.flat.element_size()

    def buffer_bytes(self) -> dict[str, int]:
        """Return the bytes this replica holds now in parameter and gradient buffers (full and shard)."""
        parameters = self.flat.untyped_storage().nbytes()
        gradients = self.flat_grad.untyped_storage().nbytes()
        if self.zero == 3:
            parameters += self.shard.untyped_storage().nbytes()
        if self.zero >= 2:
            gradients += self.shard.grad.untyped_storage().nbytes()
        return {"parameters": parameters, "gradients": gradients}


def _counted_ranges(bounds: tuple[int, int], uncounted: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the parts of the flat range ``bounds`` outside the sorted ``uncounted`` ranges."""
    low, high = bounds
    ranges, start = [], low
    for left, right in uncounted:
        if left > start:
            ranges.append((start, min(left, high)))
        start = max(start, right)
    if start < high:
        ranges.append((start, high))
    return [(a, b) for a, b in ranges if a < b]


def _allocate(tensor: torch.Tensor) -> None:
    """Give an emptied buffer its storage back (contents undefined) if it has none."""
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        storage.resize_(tensor.numel() * tensor.element_size())


def all_gather_into(output: torch.Tensor, shard: torch.Tensor, group):
    """Issue the all-gather of every replica's ``shard`` into ``output``; return the work (newer torch names it ``all_gather_single``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, shard, group=group, async_op=True)


@contextmanager
def weights_gathered(shards: Iterable[StageShard], timeout: float, rank: int, purpose: str):
    """Hold the full weights of every shard inside the block; release again those that were released before.

    Collective over the data-parallel group at ZeRO-3, where weights are stored sharded: every replica gathers
    its shards in the same order.  ``purpose`` ends the report of a gather that waits too long.
    """
    released = [shard for shard in shards if not shard.gathered]
    for shard in released:
        wait_for(shard.gather(), timeout, rank, f"gathering stage {shard.stage_index}'s weights {purpose}")
    try:
        yield
    finally:
        for shard in released:
            shard.release()
