"""``NMSparseLinear``: a linear layer stored in N:M compressed form, computed by a gather the metadata drives.

For every output ``o`` and kept value ``k`` the table ``columns[o, k]``
names the input that value multiplies; the forward gathers those inputs
(one indexed gather per block of outputs — the software form of an
accelerator's descriptor-driven loads), multiplies by the values and sums.
Its backward scatters the output gradient back to the inputs the table
names and gives gradients for the kept values only, so training keeps the
pattern.  With ``sr_ste=True`` the layer keeps a dense weight instead,
chooses the pattern from it at every forward, and trains it with the
sparse-refined straight-through estimator of Zhou et al., "Learning N:M
Fine-grained Structured Sparse Neural Networks From Scratch" (ICLR 2021):
the dense weight receives the gradient of the pruned weight at every
position, plus ``decay`` times itself where it was pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from .pattern import SPARSE_KERNELS
from .sparsity import Pattern, check_fits, columns_of, compress, decompose, decompress, nm_offsets, parse_pattern

GATHER_BLOCK = 1 << 22
"""At most this many gathered inputs are held at once (outputs are taken in blocks to stay under it)."""


def _output_blocks(rows: int, samples: int, kept: int):
    step = max(1, GATHER_BLOCK // max(1, samples * kept))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def gather_matmul(inputs: torch.Tensor, values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Return ``y[b, o] = Σ_k inputs[b, columns[o, k]] · values[o, k]`` for 2-D ``inputs`` (no autograd).

    The gather takes whole rows of the transposed input (every sample's value
    of one input), so each index moves one contiguous run of memory.
    """
    by_input = inputs.t().contiguous()
    out = inputs.new_empty(values.shape[0], inputs.shape[0])
    for start, stop in _output_blocks(values.shape[0], inputs.shape[0], values.shape[1]):
        gathered = by_input.index_select(0, columns[start:stop].reshape(-1)).view(stop - start, values.shape[1], -1)
        out[start:stop] = torch.bmm(values[start:stop].unsqueeze(1), gathered).squeeze(1)
    return out.t()


def gather_matmul_input_grad(
    grad: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Return the gradient of ``gather_matmul`` for its inputs: each output's gradient scattered to its columns."""
    by_output = grad.t().contiguous()
    grad_by_input = grad.new_zeros(in_features, grad.shape[0])
    for start, stop in _output_blocks(values.shape[0], grad.shape[0], values.shape[1]):
        spread = values[start:stop, :, None] * by_output[start:stop, None, :]
        grad_by_input.index_add_(0, columns[start:stop].reshape(-1), spread.view(-1, grad.shape[0]))
    return grad_by_input.t()


def gather_matmul_values_grad(grad: torch.Tensor, inputs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Return the gradient of ``gather_matmul`` for its values: ``Σ_b grad[b, o] · inputs[b, columns[o, k]]``."""
    by_input, by_output = inputs.t().contiguous(), grad.t().contiguous()
    grad_values = grad.new_empty(columns.shape)
    for start, stop in _output_blocks(columns.shape[0], inputs.shape[0], columns.shape[1]):
        gathered = by_input.index_select(0, columns[start:stop].reshape(-1)).view(stop - start, columns.shape[1], -1)
        grad_values[start:stop] = torch.bmm(gathered, by_output[start:stop].unsqueeze(2)).squeeze(2)
    return grad_values


class _GatherLinear(torch.autograd.Function):
    """``gather_matmul`` with its gradients for the inputs and the kept values."""

    @staticmethod
    def forward(ctx, inputs, values, columns):
        ctx.save_for_backward(inputs, values, columns)
        return gather_matmul(inputs, values, columns)

    @staticmethod
    def backward(ctx, grad):
        inputs, values, columns = ctx.saved_tensors
        grad_inputs = (
            gather_matmul_input_grad(grad, values, columns, inputs.shape[1]) if ctx.needs_input_grad[0] else None
        )
        grad_values = gather_matmul_values_grad(grad, inputs, columns) if ctx.needs_input_grad[1] else None
        return grad_inputs, grad_values, None


class _SparseRefinedLinear(torch.autograd.Function):
    """The gather forward of the pruned dense weight; backward by SR-STE to every position of the dense weight."""

    @staticmethod
    def forward(ctx, inputs, weight, columns, decay):
        values = weight.gather(1, columns)
        ctx.save_for_backward(inputs, weight, values, columns)
        ctx.decay = decay
        return gather_matmul(inputs, values, columns)

    @staticmethod
    def backward(ctx, grad):
        inputs, weight, values, columns = ctx.saved_tensors
        grad_inputs = (
            gather_matmul_input_grad(grad, values, columns, inputs.shape[1]) if ctx.needs_input_grad[0] else None
        )
        grad_weight = None
        if ctx.needs_input_grad[1]:
            pruned = torch.ones_like(weight, dtype=torch.bool).scatter(1, columns, False)
            grad_weight = grad.t() @ inputs + ctx.decay * weight * pruned
        return grad_inputs, grad_weight, None, None


class _SparseRefinedWeight(torch.autograd.Function):
    """The pruned dense weight; backward by SR-STE: the gradient at every position, plus ``decay`` × weight where
    pruned (the ``dense`` kernel's form of ``_SparseRefinedLinear``)."""

    @staticmethod
    def forward(ctx, weight, kept, decay):
        ctx.save_for_backward(weight, kept)
        ctx.decay = decay
        return weight * kept

    @staticmethod
    def backward(ctx, grad):
        weight, kept = ctx.saved_tensors
        return grad + ctx.decay * weight * ~kept, None, None


KERNELS = SPARSE_KERNELS
"""How ``NMSparseLinear`` multiplies (``pattern.SPARSE_KERNELS``, the one list the command line checks too)."""


class NMSparseLinear(nn.Module):
    """A drop-in ``nn.Linear`` whose weight is N:M sparse along its inputs and stored compressed.

    Parameters: ``values`` of shape ``(out_features, terms · in_features / M · N)``
    (or, with ``sr_ste``, a dense ``weight``) and ``bias``; buffer ``offsets``
    (uint8, ``(terms, out_features, in_features / M, N)``), the metadata.
    ``terms`` > 1 holds a dense weight exactly as a sum of N:M matrices
    (``from_dense(..., exact=True)``).  ``kernel``: ``gather`` multiplies by
    the metadata-driven gather; ``dense`` decompresses the weight and calls
    dense BLAS — the same numbers to rounding, and on a CPU many times
    faster (``docs/operators.md`` says why).  Refuses an input size that is
    not a multiple of M, and an unknown kernel, in one line.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        pattern: str | Pattern = "2:4",
        terms: int = 1,
        sr_ste: bool = False,
        decay: float = 2e-4,
        kernel: str = "gather",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: must be one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.pattern = parse_pattern(pattern)
        check_fits(in_features, self.pattern, f"a linear layer of {in_features} inputs")
        if sr_ste and terms != 1:
            raise ValueError("sr_ste=True keeps one dense weight and chooses its pattern each step: terms must be 1")
        self.in_features, self.out_features, self.terms = in_features, out_features, terms
        self.sr_ste, self.decay = sr_ste, decay
        factory = {"device": device, "dtype": dtype}
        dense = nn.Linear(in_features, out_features, bias=bias, **factory)  # nn.Linear's initialisation
        groups = in_features // self.pattern.m
        self.register_buffer(
            "offsets", torch.zeros(terms, out_features, groups, self.pattern.n, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "columns",
            torch.zeros(out_features, terms * groups * self.pattern.n, dtype=torch.long, device=device),
            persistent=False,
        )
        if sr_ste:
            self.weight = nn.Parameter(dense.weight.detach().clone())
        else:
            self.values = nn.Parameter(torch.zeros(out_features, terms * groups * self.pattern.n, **factory))
            self.load_dense(dense.weight.detach())
        self.bias = nn.Parameter(dense.bias.detach().clone()) if bias else None

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        pattern: str | Pattern = "2:4",
        exact: bool = False,
        sr_ste: bool = False,
        decay: float = 2e-4,
        kernel: str = "gather",
    ) -> NMSparseLinear:
        """Return ``linear`` as an N:M layer: magnitude-pruned, or with ``exact`` the dense weight as a sum of
        ``ceil(M/N)`` N:M terms (the same outputs as ``linear``).  Refuses anything but an ``nn.Linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense takes an nn.Linear, not a {type(linear).__name__}")
        pattern = parse_pattern(pattern)
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            pattern,
            terms=pattern.terms if exact else 1,
            sr_ste=sr_ste,
            decay=decay,
            kernel=kernel,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            if sr_ste:
                layer.weight.copy_(weight)
            else:
                layer.load_dense(weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Set the compressed weight from a dense one: pruned by magnitude, or decomposed when ``terms`` > 1."""
        if self.sr_ste:
            self.weight.copy_(weight)
            return
        parts = decompose(weight, self.pattern) if self.terms > 1 else [compress(weight, self.pattern)]
        self.offsets.copy_(torch.stack([offsets for _, offsets in parts]))
        self.values.copy_(torch.cat([values for values, _ in parts], dim=1))
        self._refresh_columns()

    def _refresh_columns(self) -> None:
        self.columns.copy_(torch.cat([columns_of(offsets, self.pattern) for offsets in self.offsets], dim=1))

    def _load_from_state_dict(self, *arguments, **keywords):
        super()._load_from_state_dict(*arguments, **keywords)
        self._refresh_columns()  # the gather table follows the loaded metadata

    def dense_weight(self) -> torch.Tensor:
        """Return the weight as the dense ``(out_features, in_features)`` matrix it stands for."""
        if self.sr_ste:
            return self.weight * self._sr_ste_kept()
        width = self.values.shape[1] // self.terms
        return sum(
            decompress(
                self.values[:, term * width : (term + 1) * width], self.offsets[term], self.pattern, self.in_features
            )
            for term in range(self.terms)
        )

    def _sr_ste_kept(self) -> torch.Tensor:
        return torch.zeros_like(self.weight, dtype=torch.bool).scatter(1, self._sr_ste_columns(), True)

    def _sr_ste_columns(self) -> torch.Tensor:
        return columns_of(nm_offsets(self.weight, self.pattern), self.pattern)

    def _semi_structured_weight(self, inputs: torch.Tensor):
        """Return the weight as PyTorch's 2:4 semi-structured tensor, when it can serve this forward, else ``None``.

        It serves 2:4 layers of one term, fp16 or bf16, on CUDA, outside
        autograd (inference), where ``torch.sparse.to_sparse_semi_structured``
        exists; it is made once per change of the values.  Not verified on a
        GPU yet.
        """
        if not (
            inputs.is_cuda
            and not torch.is_grad_enabled()
            and not self.sr_ste
            and self.terms == 1
            and str(self.pattern) == "2:4"
            and self.values.dtype in (torch.float16, torch.bfloat16)
            and hasattr(torch.sparse, "to_sparse_semi_structured")
        ):
            return None
        version = (self.values._version, self.values.data_ptr())
        if getattr(self, "_semi_structured", (None, None))[0] != version:
            self._semi_structured = (version, torch.sparse.to_sparse_semi_structured(self.dense_weight().detach()))
        return self._semi_structured[1]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        flat = inputs.reshape(-1, self.in_features)
        semi_structured = self._semi_structured_weight(inputs)
        if semi_structured is not None:
            out = torch.nn.functional.linear(flat, semi_structured)
        elif self.kernel == "dense":
            weight = (
                _SparseRefinedWeight.apply(self.weight, self._sr_ste_kept(), self.decay)
                if self.sr_ste
                else self.dense_weight()
            )
            out = flat @ weight.t()
        elif self.sr_ste:
            out = _SparseRefinedLinear.apply(flat, self.weight, self._sr_ste_columns(), self.decay)
        else:
            out = _GatherLinear.apply(flat, self.values, self.columns)
        out = out.reshape(*inputs.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        mode = ", sr_ste" if self.sr_ste else (f", terms={self.terms}" if self.terms > 1 else "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern}{mode}, kernel={self.kernel}"
        )


def sparsify(
    model: nn.Module,
    pattern: str | Pattern = "2:4",
    layers=None,
    skip=(),
    sr_ste: bool = False,
    decay: float = 2e-4,
    kernel: str = "gather",
) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers by magnitude-pruned ``NMSparseLinear`` in place; return ``model``.

    ``layers``: the names (as in ``model.named_modules()``) to convert, every
    ``nn.Linear`` when ``None``; ``skip``: names to leave dense (a name also
    matches as the last parts of a longer one: ``head`` matches ``5.head``).
    ``sr_ste``, ``decay`` and ``kernel`` are ``NMSparseLinear``'s.  Refuses,
    in one line, a name that matches nothing, a named layer that is not an
    ``nn.Linear``, and a layer whose input size does not fit the pattern.
    """
    pattern = parse_pattern(pattern)
    modules = dict(model.named_modules())
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear) and name]
    chosen = linear if layers is None else [match for name in layers for match in _matches(name, modules, "layers")]
    left_dense = {match for name in skip for match in _matches(name, modules, "skip")}
    for name in chosen:
        if not isinstance(modules[name], nn.Linear):
            raise ValueError(
                f"layers: {name!r} is a {type(modules[name]).__name__}, not an nn.Linear; "
                f"the linear layers are {', '.join(linear) or 'none'}"
            )
    for name in chosen:
        if name in left_dense or any(name.startswith(dense + ".") for dense in left_dense):
            continue
        check_fits(modules[name].in_features, pattern, f"layer {name!r}")
        parent, _, child = name.rpartition(".")
        modules[parent]._modules[child] = NMSparseLinear.from_dense(
            modules[name], pattern, sr_ste=sr_ste, decay=decay, kernel=kernel
        )
    return model


def _matches(name: str, modules: dict, option: str) -> list[str]:
    """Return the qualified names ``name`` stands for (itself, or the modules whose names end in ``.name``)."""
    found = [qualified for qualified in modules if qualified and (qualified == name or qualified.endswith("." + name))]
    if not found:
        known = [qualified for qualified in modules if qualified]
        shown = ", ".join(known[:20]) + (f", … ({len(known)} in all)" if len(known) > 20 else "")
        raise ValueError(f"{option}: no layer named {name!r}; the layers are {shown}")
    return found
