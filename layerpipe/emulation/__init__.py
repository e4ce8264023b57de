"""Single-process emulation of asynchronous pipelined backpropagation (``PipelinedBackprop``)."""

from .pipelined import WEIGHT_POLICIES, PipelinedBackprop, VersionRecord

__all__ = ["WEIGHT_POLICIES", "PipelinedBackprop", "VersionRecord"]
