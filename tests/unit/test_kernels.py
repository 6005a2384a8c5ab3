"""The compiled CPU kernels of the sparse decoder (model/kernels.c) against a float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from clt_core.model import kernels

pytestmark = pytest.mark.skipif(not kernels.available(torch.empty(0, dtype=torch.bfloat16)), reason="no C compiler")


def entries(groups: int, per_group: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR pointers `[groups+1]`, column indices and positive values of a random pattern with uneven groups."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * per_group + 1, (groups,), generator=gen)
    ptr = torch.zeros(groups + 1, dtype=torch.int64)
    ptr[1:] = counts.cumsum(0)
    cols = torch.randint(0, columns, (int(ptr[-1]),), generator=gen)
    return ptr, cols, torch.rand(len(cols), generator=gen) + 0.1


# d: the vector path (a multiple of 128), its 16-wide tail, and the scalar tail; 3,000 entries run on one thread,
# 40,000 on all of them
@pytest.mark.parametrize(("d", "B", "k"), [(128, 300, 10), (80, 2000, 20), (40, 300, 10), (576, 2000, 20)])
def test_decode_equals_the_float64_reference(d: int, B: int, k: int) -> None:
    T, F = 3, 96
    ptr, feat, val = entries(B, k, F, seed=d)
    W = torch.randn(T, F, d).bfloat16()
    start = torch.randn(T, B, d)
    out = start.clone()
    kernels.decode(out, W, ptr, feat, val)
    tok = torch.repeat_interleave(torch.arange(B), torch.diff(ptr))
    expected = start.double().index_add(1, tok, val.double()[None, :, None] * W.double()[:, feat])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("d", "B", "k"), [(128, 300, 10), (80, 2000, 20), (40, 300, 10), (576, 2000, 20)])
def test_decoder_backward_equals_the_float64_reference(d: int, B: int, k: int) -> None:
    T, F = 3, 96
    ptr, tok, val = entries(F, B * k // F, B, seed=d)
    G, W = torch.randn(T, B, d).bfloat16(), torch.randn(T, F, d).bfloat16()
    dW = torch.full_like(W, float("nan"))  # every entry must be written
    dots = kernels.decoder_backward(G, W, dW, ptr, tok, val)
    feat = torch.repeat_interleave(torch.arange(F), torch.diff(ptr))
    Gd, Wd = G.double(), W.double()
    expected_dots = (Gd[:, tok] * Wd[:, feat]).sum(dim=(0, 2))
    expected_dW = torch.zeros(T, F, d, dtype=torch.float64).index_add(1, feat, val.double()[None, :, None] * Gd[:, tok])
    torch.testing.assert_close(dots.double(), expected_dots, rtol=1e-5, atol=1e-4)
    # dW is rounded to bf16 once (2^-9 relative), after a float32 sum of products whose values were rounded to bf16
    # (2^-9 of each term, vdpbf16ps), so the bound is relative to the sum of the terms' magnitudes where they cancel
    magnitudes = torch.zeros_like(expected_dW).index_add(1, feat, val.double()[None, :, None] * Gd[:, tok].abs())
    error = (dW.double() - expected_dW).abs()
    assert bool((error <= 2**-8 * expected_dW.abs() + 2**-8 * magnitudes + 1e-6).all()), float(error.max())


def test_operands_of_the_wrong_dtype_or_layout_are_refused() -> None:
    ptr, feat, val = entries(8, 2, 16, seed=0)
    W = torch.randn(2, 16, 32).bfloat16()
    with pytest.raises(ValueError, match="contiguous expected"):
        kernels.decode(torch.zeros(2, 8, 32, dtype=torch.bfloat16), W, ptr, feat, val)
    with pytest.raises(ValueError, match="contiguous expected"):
        kernels.decode(torch.zeros(8, 2, 32).transpose(0, 1), W, ptr, feat, val)
    with pytest.raises(ValueError, match="decode"):
        kernels.decode(torch.zeros(2, 9, 32), W, ptr, feat, val)


def test_entries_above_a_floor_are_those_of_the_float32_matrix() -> None:
    low, bias = torch.randn(300, 96).bfloat16(), torch.randn(96)
    z = (low.float() + bias).reshape(-1)
    floor = float(z.kthvalue(z.numel() - 2000).values)
    positions, values = kernels.entries_above(low, bias, floor, capacity=5000)
    expected = (z >= floor).nonzero().squeeze(1)
    assert torch.equal(positions, expected) and torch.equal(values, z[expected])
    assert kernels.entries_above(low, bias, floor, capacity=100) is None  # more than asked for


def test_batchtopk_selection_from_the_bf16_matmul_equals_the_float32_one() -> None:
    """`Selector.layer_from_low` (no float32 pre-activations) picks what `layer` picks, ties included."""
    from clt_core.model.parallel import FeatureShards
    from clt_core.model.sparse import Selector

    select = Selector(4, per_batch=True, scope="per_layer", shards=FeatureShards())
    low = (torch.randn(512, 256) * 4).round().bfloat16()  # integers: ties everywhere, also at the threshold
    bias = torch.randn(256).round()
    found = select.layer_from_low(low, bias)
    assert found is not None
    expected = select.layer(low.float() + bias)
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


def test_error_equals_the_reconstruction_plus_bias_minus_the_targets() -> None:
    L, B, d = 3, 50, 40  # 40: the vector path and its scalar tail
    recon, targets, b_dec = torch.randn(L, B, d), torch.randn(B, L, d).bfloat16(), torch.randn(L, d)
    out = recon.clone()
    kernels.error(out, targets, b_dec)
    torch.testing.assert_close(out, recon + b_dec[:, None] - targets.float().transpose(0, 1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="error"):
        kernels.error(out, targets[:, :2].contiguous(), b_dec)


@pytest.mark.parametrize(
    ("decoupled", "weight_decay", "swapped"), [(True, 0.01, True), (False, 0.01, False), (True, 0.0, True)]
)
def test_adam_equals_pytorchs_fused_adam_and_rewrites_the_compute_copy(
    decoupled: bool, weight_decay: float, swapped: bool
) -> None:
    """Three updates from bf16 gradients of a swapped compute copy: the parameter and moments of
    `torch.optim.Adam(W)(fused=True)` fed the same gradients in float32, and the copy is the parameter in bf16."""
    A, P, d = 6, 5, 40
    param = torch.randn(A, P, d)
    reference = param.clone().requires_grad_(True)
    options = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay, "fused": True}
    optimizer = (torch.optim.AdamW if decoupled else torch.optim.Adam)([reference], **options)  # type: ignore[arg-type]
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    copy = (param.transpose(0, 1) if swapped else param).bfloat16().contiguous()
    for step in range(1, 4):
        grad = torch.randn(copy.shape).bfloat16()
        kernels.adam(param, m, v, grad, copy, swapped=swapped, grad_scale=0.5, lr=1e-2, weight_decay=weight_decay,
                     decoupled=decoupled, betas=(0.9, 0.999), eps=1e-8, step=float(step))  # fmt: skip
        reference.grad = 0.5 * (grad.float().transpose(0, 1) if swapped else grad.float()).contiguous()
        optimizer.step()
    state = optimizer.state[reference]
    torch.testing.assert_close(param, reference.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, state["exp_avg"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(v, state["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    assert torch.equal(copy, (param.transpose(0, 1) if swapped else param).bfloat16())


def test_feature_major_order_is_the_stable_argsort_of_each_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    ptr, F = [0, 500, 500, 1700], 64  # an empty layer between two others
    features, tokens = torch.randint(0, F, (1700,), generator=gen), torch.randint(0, 300, (1700,), generator=gen)
    order, tokens_by_f, bounds = kernels.feature_major(features, tokens, torch.tensor(ptr), F)
    for layer, (lo, hi) in enumerate(itertools.pairwise(ptr)):
        expected = torch.argsort(features[lo:hi], stable=True)
        assert torch.equal(order[lo:hi], expected)
        assert torch.equal(tokens_by_f[lo:hi], tokens[lo:hi][expected])
        counts = torch.bincount(features[lo:hi], minlength=F)
        assert torch.equal(bounds[layer], torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))


def test_prepare_rows_equals_the_normalizer_and_flags_nan_rows() -> None:
    """The sampler's compiled pass gives `_prepare`'s values exactly, in the shuffled places, and flags the rows
    holding NaN/Inf."""
    from clt_core.data.layout import ActivationRows
    from clt_core.data.sampler import Normalizer, _prepare

    gen = torch.Generator().manual_seed(0)
    n, L, d = 40, 3, 40  # 120 values a row: the vector path and its tail
    rows = (torch.randn(n, L, d, generator=gen) * 3 + 1).bfloat16()
    rows[7, 1, 5], rows[11, 2, 39] = float("nan"), float("inf")
    norm = Normalizer(torch.randn(L, d), torch.rand(L, d) + 0.5, torch.zeros(L, d), torch.ones(L, d))
    positions = torch.randperm(n, generator=gen)
    out, bad = torch.empty(n, L, d, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bool)
    kernels.prepare_rows(rows, norm.inputs_scale, norm.inputs_bias, out, positions, bad)
    expected = _prepare(ActivationRows(rows, rows, torch.zeros(n, dtype=torch.int32)), norm, torch.bfloat16).inputs
    torch.testing.assert_close(out[positions], expected, rtol=0, atol=0, equal_nan=True)  # bit for bit but NaN's bits
    assert bad.nonzero().flatten().tolist() == [7, 11]
    copied = torch.empty_like(out)
    kernels.prepare_rows(rows, None, None, copied, positions, torch.zeros(n, dtype=torch.bool))
    assert torch.equal(copied[positions].view(torch.int16), rows.view(torch.int16))
