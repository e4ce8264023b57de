"""The shape agreement: before the first program runs on inputs of a new shape, every rank learns every stage's
output shapes and dtypes (the boundary *metas*), which size the receive buffers of the programs.

``ShapeAgreement`` passes micro-batch 0 once through the pipeline on fake
tensors (shapes without values, ``meta_forward``), falling back to a real
forward that undoes its side effects; ``BoundaryShapes`` keeps what was agreed per input signature and
agrees on first use, with every local stage's full weights held.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .context import RankContext
from .meta_forward import CannotRunFake, fake_forward, fake_inputs, fake_mode, fake_tensors, restoring
from .p2p import wait_for
from .precision import compute
from .sharding import StageShard, weights_gathered
from .stage import (
    HEADER_LENGTH,
    PipelineError,
    Stage,
    TensorMeta,
    UnevenMetas,
    decode_header,
    encode_header,
    metas_of,
)
from .tags import agree_tag, check_tensor_count

Metas = tuple[tuple[TensorMeta, ...], ...]

FAILED = "failed"
"""In place of a stage's metas: it, or a stage before it, could not run on fake tensors."""


def _failed_header() -> torch.Tensor:
    """Return the header that stands for ``FAILED`` (a count of -1)."""
    header = torch.zeros(HEADER_LENGTH, dtype=torch.int64)
    header[0] = -1
    return header


def _decoded(header: torch.Tensor):
    """Return the metas a header describes, or ``FAILED``."""
    return FAILED if int(header[0]) == -1 else decode_header(header)


def signature_of(first_microbatch: tuple) -> tuple:
    """Return the shapes and dtypes of a micro-batch's tensors: the key of an agreement."""
    return tuple((tuple(t.shape), t.dtype) for t in first_microbatch)


def check_agreed(rank: int, stage: int, microbatch: int, produced: tuple, expected: tuple | None) -> None:
    """Refuse, with ``PipelineError``, a stage's outputs of other shapes or dtypes than the agreed ``expected``
    (``None``: nothing agreed, each message announces its shapes)."""
    if expected is None:
        return
    if len(produced) != len(expected) or any(
        tuple(t.shape) != meta.shape or t.dtype != meta.dtype for t, meta in zip(produced, expected)
    ):
        found = ", ".join(str(m) for m in metas_of(produced))
        agreed = ", ".join(str(m) for m in expected)
        raise PipelineError(
            f"rank {rank}: stage {stage} produced ({found}) for micro-batch "
            f"{microbatch}, but the pipeline agreed on ({agreed}) from micro-batch 0 of the first "
            f"step: every micro-batch must give a stage outputs of the same shapes and dtypes"
        )


class ShapeAgreement:
    """Agrees the boundary metas of ``context.rank``'s pipeline over the ``stages`` it holds (by stage index).

    ``group`` is the pipeline's ranks (the default group when there is one pipeline).
    """

    def __init__(self, context: RankContext, stages: dict[int, Stage], group=None):
        self.context, self.stages, self.group = context, stages, group

    def agree(self, first_microbatch: tuple[torch.Tensor, ...]) -> Metas:
        """Return every stage's output metas, found without side effects.

        First every stage runs on fake tensors (``meta_forward``): only the
        metas travel, nothing is computed, and no buffer, parameter or
        random state changes.  When a stage cannot run fake, every rank
        learns it from the shared table and the pipeline passes micro-batch
        0 through its stages for real, without gradients, undoing the
        buffer and random-state changes (``restoring``), with a warning on
        the rank of that stage.  Collective: every rank calls it with the
        same input.  Refuses, with ``PipelineError``, a stage that fails or
        passes more tensors than a message carries.
        """
        metas, causes = self._agree_fake(first_microbatch)
        shared = self._share_metas(metas)
        if all(metas is not FAILED for metas in shared):
            return shared
        for stage, cause in causes.items():
            warnings.warn(
                f"layerpipe: stage {stage} cannot run on meta tensors to agree the boundary shapes ({cause}); "
                f"they were agreed with a real forward of micro-batch 0 whose changes to buffers and random "
                f"states were undone",
                stacklevel=4,
            )
        with restoring(self.stages.values(), self.context.device):
            return self._share_metas(self._agree_real(first_microbatch))

    def _agree_fake(self, first_microbatch: tuple) -> tuple[list, dict[int, str]]:
        """Return every local stage's metas found on fake tensors (``FAILED`` where it or a stage before failed),
        and why each local stage that could not run fake failed."""
        placement, device, mode = self.context.placement, self.context.device, fake_mode()
        metas: list = [None] * placement.stages
        causes: dict[int, str] = {}
        previous = None
        for stage in (index for index in range(placement.stages) if self.context.owns(index)):
            if stage == 0:
                inputs = fake_inputs(mode, first_microbatch, device)
            elif placement.receives_forward[stage]:
                received = self._receive_header(stage, placement.rank_of(stage - 1))
                inputs = FAILED if received is FAILED else fake_tensors(mode, received, device)
            else:
                inputs = FAILED if previous is FAILED else fake_tensors(mode, previous, device)
            previous = FAILED
            if inputs is not FAILED:
                try:
                    outputs = fake_forward(mode, self.stages[stage], inputs, self.context.precision, device)
                    previous = metas_of(outputs)
                    check_tensor_count(stage, len(previous))
                except CannotRunFake as cause:
                    causes[stage] = str(cause)
            if placement.sends_forward[stage]:
                self._send_header(stage, placement.rank_of(stage + 1), previous)
            metas[stage] = previous
        return metas, causes

    def _agree_real(self, first_microbatch: tuple) -> list:
        """Return every local stage's metas found by passing micro-batch 0 through the pipeline, without gradients."""
        placement = self.context.placement
        metas: list[tuple[TensorMeta, ...] | None] = []
        previous_output = None
        with torch.no_grad():
            for stage in range(placement.stages):
                if not self.context.owns(stage):
                    metas.append(None)
                    continue
                if stage == 0:
                    inputs = tuple(t.to(self.context.device) for t in first_microbatch)
                elif placement.receives_forward[stage]:
                    inputs = self._agree_receive(stage, placement.rank_of(stage - 1))
                else:
                    inputs = previous_output
                previous_output = self._agree_forward(stage, inputs)
                found = metas_of(previous_output)
                check_tensor_count(stage, len(found))
                if placement.sends_forward[stage]:
                    self._agree_send(stage, placement.rank_of(stage + 1), previous_output, found)
                metas.append(found)
        return metas

    def _send_header(self, stage: int, peer: int, metas) -> None:
        """Send stage ``stage``'s output metas (or ``FAILED``) to ``peer`` while agreeing on fake tensors."""
        header = (_failed_header() if metas is FAILED else encode_header(metas)).to(self.context.device)
        what = f"sending stage {stage}'s output shapes to rank {peer} while agreeing tensor shapes"
        work = dist.isend(header, dst=self.context.peers[peer], tag=agree_tag(stage, 0))
        wait_for(work, self.context.timeout, self.context.rank, what)

    def _receive_header(self, stage: int, peer: int):
        """Return stage ``stage - 1``'s output metas (or ``FAILED``) from ``peer``."""
        header = torch.empty(HEADER_LENGTH, dtype=torch.int64, device=self.context.device)
        what = f"while agreeing tensor shapes for stage {stage - 1}'s output from rank {peer}"
        work = dist.irecv(header, src=self.context.peers[peer], tag=agree_tag(stage - 1, 0))
        wait_for(work, self.context.timeout, self.context.rank, what)
        return _decoded(header.cpu())

    def _agree_forward(self, stage: int, inputs: tuple) -> tuple:
        try:
            with compute(self.context.precision, self.context.device):
                return self.stages[stage](*inputs)
        except Exception as error:
            raise PipelineError(
                f"rank {self.context.rank}: stage {stage} failed on micro-batch 0 while agreeing tensor shapes: {error}"
            ) from error

    def _agree_send(self, stage: int, peer: int, tensors, metas) -> None:
        destination = self.context.peers[peer]
        what = f"sending stage {stage}'s output to rank {peer} while agreeing tensor shapes"
        messages = [encode_header(metas).to(self.context.device), *(tensor.contiguous() for tensor in tensors)]
        works = [
            dist.isend(message, dst=destination, tag=agree_tag(stage, slot)) for slot, message in enumerate(messages)
        ]
        for work in works:
            wait_for(work, self.context.timeout, self.context.rank, what)

    def _agree_receive(self, stage: int, peer: int) -> tuple[torch.Tensor, ...]:
        """Return stage ``stage - 1``'s output from ``peer``; every wait is timed and reported like a program's."""
        source, device, rank = self.context.peers[peer], self.context.device, self.context.rank
        what = f"while agreeing tensor shapes for stage {stage - 1}'s output from rank {peer}"
        header = torch.empty(HEADER_LENGTH, dtype=torch.int64, device=device)
        wait_for(dist.irecv(header, src=source, tag=agree_tag(stage - 1, 0)), self.context.timeout, rank, what)
        tensors = []
        for slot, meta in enumerate(decode_header(header.cpu())):
            buffer = torch.empty(meta.shape, dtype=meta.dtype, device=device)
            wait_for(
                dist.irecv(buffer, src=source, tag=agree_tag(stage - 1, 1 + slot)), self.context.timeout, rank, what
            )
            tensors.append(buffer)
        return tuple(tensors)

    def _share_metas(self, metas: list) -> tuple[tuple[TensorMeta, ...], ...]:
        """Return the metas of every stage, each filled in by the rank that owns it.

        Exchanged as tensors, not pickles: each rank writes the encoded
        header of its own stages into a zeroed table, and a sum over the
        pipeline's ranks fills in every row (one owner per stage).
        """
        if len(self.context.peers) == 1:
            return tuple(metas)
        table = torch.zeros(len(metas), HEADER_LENGTH, dtype=torch.int64)
        for stage, found in enumerate(metas):
            if found is not None:
                table[stage] = _failed_header() if found is FAILED else encode_header(found)
        table = table.to(self.context.device)
        dist.all_reduce(table, group=self.group)
        return tuple(_decoded(row) for row in table.cpu())


class BoundaryShapes:
    """The boundary metas agreed so far, per input signature; a new signature is agreed on first use.

    ``shards`` are the local stages' shards: at ZeRO-3 their weights are
    gathered for the agreement (collective over the data-parallel group).
    """

    def __init__(self, agreement: ShapeAgreement, shards: dict[int, StageShard], timeout: float, rank: int):
        self._agreement, self._shards, self._timeout, self._rank = agreement, shards, timeout, rank
        self._agreed: dict[tuple, Metas] = {}

    def metas_for(self, first_microbatch: tuple, signature: tuple | None = None) -> Metas:
        """Return every stage's output metas for inputs shaped like ``first_microbatch`` (agreed on first use).

        ``signature`` keys the agreement (the micro-batch's shapes by default).
        """
        signature = signature or signature_of(first_microbatch)
        metas = self._agreed.get(signature)
        if metas is None:
            purpose = "to agree the boundary shapes"
            with weights_gathered(self._shards.values(), self._timeout, self._rank, purpose):
                metas = self._agreement.agree(first_microbatch)
            self._agreed[signature] = metas
        return metas

    def metas_for_parts(self, parts: list[tuple], signature: tuple | None = None) -> Metas:
        """Return every stage's output metas for the micro-batches ``parts`` (agreed on first use).

        When the last micro-batch differs from the others (an uneven
        evaluation batch), both shapes are agreed and ``UnevenMetas`` holds
        them with each micro-batch's loss weight.
        """
        metas = self.metas_for(parts[0], signature)
        last = signature_of(parts[-1])
        if last == signature_of(parts[0]):
            return metas
        sizes = tuple(part[0].shape[0] if part and part[0].dim() else 1 for part in parts)
        return UnevenMetas(metas, self.metas_for(parts[-1], ("last", signature, last)), sizes)

    def agreed(self) -> Iterator[Metas]:
        """Yield the metas agreed so far, in the order they were agreed (one per input signature)."""
        yield from self._agreed.values()

    def first(self) -> Metas:
        """Return the metas agreed first (those of the first batch's shapes); ``LookupError`` before any run."""
        for metas in self._agreed.values():
            return metas
        raise LookupError("no boundary shapes agreed yet: run a step first")
