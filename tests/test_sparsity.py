"""N:M sparsity: pruning, the compressed form, NMSparseLinear, sparsify, decomposition, PyTorch's 2:4 layout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from runtime_models import reference_run, relative_error
from torch import nn

import layerpipe
from layerpipe.knobs import ConfigError
from layerpipe.ops import (
    NMSparseLinear,
    Pattern,
    compress,
    decompose,
    decompress,
    nm_mask,
    parse_pattern,
    prune,
    sparse_linear,
    sparsify,
)
from layerpipe.ops.sparsity import semi_structured_metadata

PATTERNS = ["2:4", "1:4", "4:8", "3:8", "1:2"]


def random_weight(rows=8, inputs=16, seed=0):
    return torch.randn(rows, inputs, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def masked_linear(linear: nn.Linear, pattern: str) -> nn.Linear:
    """The reference: an nn.Linear whose weight is the magnitude-N:M-pruned dense weight."""
    reference = copy.deepcopy(linear)
    with torch.no_grad():
        reference.weight.copy_(prune(linear.weight, parse_pattern(pattern)))
    return reference


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pruning_keeps_the_n_largest_magnitudes_of_every_group_of_m_inputs(pattern):
    pattern, weight = parse_pattern(pattern), random_weight()
    kept = nm_mask(weight, pattern).view(8, -1, pattern.m)
    magnitudes = weight.abs().view(8, -1, pattern.m)
    assert (kept.sum(-1) == pattern.n).all()
    smallest_kept = torch.where(kept, magnitudes, math.inf).min(-1).values
    largest_pruned = torch.where(kept, -math.inf, magnitudes).max(-1).values
    assert (smallest_kept >= largest_pruned).all()


def test_ties_go_to_the_lower_input_so_pruning_is_deterministic():
    weight = torch.ones(2, 4, dtype=torch.float64)
    assert nm_mask(weight, Pattern(2, 4)).tolist() == [[True, True, False, False]] * 2


@pytest.mark.parametrize("pattern", PATTERNS)
def test_decompressing_the_compressed_weight_gives_the_pruned_weight_exactly(pattern):
    pattern, weight = parse_pattern(pattern), random_weight()
    values, offsets = compress(weight, pattern)
    assert values.shape == (8, 16 // pattern.m * pattern.n) and offsets.dtype == torch.uint8
    assert torch.equal(decompress(values, offsets, pattern, 16), prune(weight, pattern))


@pytest.mark.parametrize("text", ["5:4", "0:4", "4:4", "2-4", "abc", "2:99", 24])
def test_a_pattern_that_cannot_be_is_refused_in_one_line(text):
    with pytest.raises(ConfigError) as refused:
        parse_pattern(text)
    assert str(refused.value).startswith(f"pattern={text!r}: ") and "\n" not in str(refused.value)


def test_an_input_size_that_is_not_a_multiple_of_m_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^a linear layer of 10 inputs has 10 inputs, not a multiple of M = 4"):
        NMSparseLinear(10, 3, pattern="2:4")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_sparse_layer_equals_the_masked_dense_layer_forward_and_backward(pattern):
    torch.manual_seed(0)
    dense = nn.Linear(16, 8).double()
    sparse, reference = NMSparseLinear.from_dense(dense, pattern), masked_linear(dense, pattern)
    inputs = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    reference_inputs = inputs.detach().clone().requires_grad_()
    grad = torch.randn(3, 5, 8, dtype=torch.float64)
    out, expected = sparse(inputs), reference(reference_inputs)
    assert relative_error(out.detach(), expected.detach()) < 1e-14
    out.backward(grad)
    expected.backward(grad)
    assert relative_error(inputs.grad, reference_inputs.grad) < 1e-14
    assert relative_error(sparse.bias.grad, reference.bias.grad) < 1e-14
    kept_grad, _ = compress(reference.weight.grad, parse_pattern(pattern), sparse.offsets[0])
    assert relative_error(sparse.values.grad, kept_grad) < 1e-14


def test_the_gather_kernel_passes_gradcheck_and_gives_the_same_numbers_in_small_blocks(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(4, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    values, offsets = compress(random_weight(), Pattern(2, 4))
    values.requires_grad_()
    columns = sparse_linear.columns_of(offsets, Pattern(2, 4))
    assert torch.autograd.gradcheck(sparse_linear._GatherLinear.apply, (inputs, values, columns))
    whole = sparse_linear._GatherLinear.apply(inputs, values, columns)
    monkeypatch.setattr(sparse_linear, "GATHER_BLOCK", 8)  # one output row per block
    assert torch.equal(sparse_linear._GatherLinear.apply(inputs, values, columns), whole)
    assert torch.autograd.gradcheck(sparse_linear._GatherLinear.apply, (inputs, values, columns))


def _train(layer: nn.Module, steps: int, gradient_mask=None):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(6, 16, dtype=torch.float64, generator=generator)
        targets = torch.randn(6, 8, dtype=torch.float64, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(inputs), targets).backward()
        if gradient_mask is not None:
            layer.weight.grad *= gradient_mask
        optimizer.step()
    return layer


def test_training_keeps_the_pattern_and_equals_masked_dense_training():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8).double()
    sparse, reference = NMSparseLinear.from_dense(dense, "2:4"), masked_linear(dense, "2:4")
    mask = nm_mask(dense.weight, Pattern(2, 4))
    _train(sparse, 5)
    _train(reference, 5, gradient_mask=mask)
    assert relative_error(sparse.dense_weight().detach(), reference.weight.detach()) < 1e-13
    assert torch.equal(sparse.dense_weight().detach() != 0, mask)


def test_sr_ste_gives_the_dense_weight_the_pruned_weights_gradient_plus_decay_where_pruned():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8).double()
    sparse, reference = NMSparseLinear.from_dense(dense, "2:4", sr_ste=True, decay=0.5), masked_linear(dense, "2:4")
    inputs = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    reference_inputs = inputs.detach().clone().requires_grad_()
    out, expected = sparse(inputs), reference(reference_inputs)
    assert relative_error(out.detach(), expected.detach()) < 1e-14
    out.sum().backward()
    expected.sum().backward()
    pruned = ~nm_mask(dense.weight, Pattern(2, 4))
    assert relative_error(sparse.weight.grad, reference.weight.grad + 0.5 * dense.weight.detach() * pruned) < 1e-14
    assert relative_error(inputs.grad, reference_inputs.grad) < 1e-14


def test_sr_ste_lets_the_pattern_change_while_the_fixed_pattern_stays():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8).double()
    before = nm_mask(dense.weight, Pattern(2, 4))
    refined = _train(NMSparseLinear.from_dense(dense, "2:4", sr_ste=True), 30)
    fixed = _train(NMSparseLinear.from_dense(dense, "2:4"), 30)
    assert not torch.equal(refined.dense_weight().detach() != 0, before)
    assert torch.equal(fixed.dense_weight().detach() != 0, before)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4)
    ).double()


def test_sparsify_equals_magnitude_pruning_of_the_original_model_and_can_leave_the_head_dense():
    original = small_model()
    pruned = copy.deepcopy(original)
    with torch.no_grad():
        for name in ("0", "2.0"):
            layer = pruned.get_submodule(name)
            layer.weight.copy_(prune(layer.weight, Pattern(2, 4)))
    model = sparsify(copy.deepcopy(original), "2:4", skip=["3"])
    assert isinstance(model[0], NMSparseLinear) and isinstance(model[2][0], NMSparseLinear)
    assert type(model[3]) is nn.Linear
    inputs = torch.randn(5, 8, dtype=torch.float64)
    assert relative_error(model(inputs), pruned(inputs)) < 1e-14


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"layers": ["1"]}, r"^layers: '1' is a Tanh, not an nn.Linear; the linear layers are 0, 2.0, 3$"),
        ({"skip": ["head"]}, r"^skip: no layer named 'head'; the layers are 0, 1, 2, 2.0, 2.1, 3$"),
        ({"pattern": "3:16"}, r"^layer '0' has 8 inputs, not a multiple of M = 16"),
        ({"pattern": "5:4"}, r"^pattern='5:4': needs 1 <= N < M"),
    ],
)
def test_sparsify_refuses_bad_names_and_unfit_layers_in_one_line(arguments, message):
    with pytest.raises(ValueError, match=message):
        sparsify(small_model(), **arguments)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_dense_matrix_is_the_exact_sum_of_ceil_m_over_n_nm_terms(pattern):
    pattern, weight = parse_pattern(pattern), random_weight(rows=6, inputs=24)
    terms = decompose(weight, pattern)
    assert len(terms) == math.ceil(pattern.m / pattern.n)
    inputs = torch.randn(24, 5, dtype=torch.float64)
    parts = [decompress(values, offsets, pattern, 24) for values, offsets in terms]
    for part in parts:
        assert ((part != 0).view(6, -1, pattern.m).sum(-1) <= pattern.n).all()
    total = sum(part @ inputs for part in parts)
    assert (total - weight @ inputs).abs().max() <= 1e-12
    torch.manual_seed(1)
    dense = nn.Linear(24, 6).double()
    exact = NMSparseLinear.from_dense(dense, pattern, exact=True)
    assert (exact(inputs.t()) - dense(inputs.t())).abs().max() <= 1e-12


def test_the_2_4_metadata_agrees_with_pytorchs_own_fp16_conversion():
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(5)).half()
    values, offsets = compress(weight, Pattern(2, 4))
    metadata = semi_structured_metadata(offsets)
    their_values, their_metadata = sparse_semi_structured_from_dense_cutlass(prune(weight, Pattern(2, 4)))
    assert torch.equal(values, their_values)
    assert torch.equal(metadata, their_metadata)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, metadata), prune(weight, Pattern(2, 4)))


def _sparse_layers():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)]
    return [
        sparsify(nn.Sequential(layer.double()), "2:4")[0] if isinstance(layer, nn.Linear) else layer for layer in layers
    ]


def _sparse_batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return (
        torch.randn(8, 8, dtype=torch.float64, generator=generator),
        torch.randn(8, 3, dtype=torch.float64, generator=generator),
    )


def _sparse_pipeline_run():
    expected_losses, _, expected = reference_run(
        _sparse_layers(), 3, lr=0.01, batches=[_sparse_batch(step) for step in range(3)]
    )
    pipe = layerpipe.Pipeline(
        _sparse_layers(),
        nn.functional.mse_loss,
        schedule="breadth-first",
        microbatches=4,
        stages_per_rank=2,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
        timeout=60,
    )
    losses = [pipe.train_step(*_sparse_batch(step)) for step in range(3)]
    loss_error = max(abs(found - wanted) / abs(wanted) for found, wanted in zip(losses, expected_losses))
    return loss_error, max(relative_error(p.detach(), expected[name]) for name, p in pipe.named_parameters())


@pytest.mark.multiprocess
def test_a_pipeline_of_sparsified_layers_equals_the_single_process_sparsified_model():
    for rank, (loss_error, parameter_error) in enumerate(layerpipe.launch(_sparse_pipeline_run, 2)):
        assert loss_error <= 1e-12, f"rank {rank}: loss error {loss_error:.2e}"
        assert parameter_error <= 1e-10, f"rank {rank}: parameter error {parameter_error:.2e}"


@pytest.mark.parametrize("sr_ste", [False, True], ids=["fixed", "sr-ste"])
def test_the_dense_kernel_gives_the_gather_kernels_numbers(sr_ste):
    torch.manual_seed(0)
    dense = nn.Linear(16, 8).double()
    gather = NMSparseLinear.from_dense(dense, "2:4", sr_ste=sr_ste, decay=0.5)
    blas = NMSparseLinear.from_dense(dense, "2:4", sr_ste=sr_ste, decay=0.5, kernel="dense")
    inputs = torch.randn(4, 3, 16, dtype=torch.float64, requires_grad=True)
    other = inputs.detach().clone().requires_grad_()
    found, expected = blas(other), gather(inputs)
    assert relative_error(found, expected) < 1e-14
    found.square().sum().backward()
    expected.square().sum().backward()
    assert relative_error(other.grad, inputs.grad) < 1e-14
    for (name, mine), theirs in zip(blas.named_parameters(), gather.parameters()):
        assert relative_error(mine.grad, theirs.grad) < 1e-14, name


def test_an_unknown_kernel_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^kernel='cuda': must be one of gather, dense$"):
        NMSparseLinear(8, 4, kernel="cuda")
