"""The CLT model package: JumpReLU straight-through gradients, top-k selection, sparse vs dense decoding, the whole
module's forward/backward, parameter layout and shard-reproducible init, loss normalisation, AuxK and config checks.
Small shapes on CPU; float64 wherever results are compared tightly."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from clt_core.errors import ConfigError
from clt_core.model import CLTConfig, CLTOutput, CrossLayerTranscoder, FeatureShards, clt_loss
from clt_core.model.activations import JumpReLU, jumprelu, select_topk
from clt_core.model.decode import decode

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

F64 = torch.float64
ACTIVATIONS = ["jumprelu", "relu", "batchtopk", "topk"]
DECODERS = ["cross_layer", "per_layer"]


def make_model(
    activation: str = "relu",
    *,
    L: int = 3,
    d: int = 4,
    F: int = 16,
    dtype: torch.dtype = F64,
    shards: FeatureShards | None = None,
    randomise_biases: bool = False,
    **config: Any,
) -> CrossLayerTranscoder:
    """A small CLT; `randomise_biases` makes b_enc/b_dec nonzero so they take part in every check."""
    config.setdefault("k", 2)
    cfg = CLTConfig(num_layers=L, d_model=d, num_features=F, activation_fn=activation, **config)
    model = CrossLayerTranscoder(cfg, shards, dtype=dtype)
    if randomise_biases:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.b_enc.copy_(0.05 * torch.randn(model.b_enc.shape, generator=gen, dtype=dtype))
            model.b_dec.copy_(0.1 * torch.randn(model.b_dec.shape, generator=gen, dtype=dtype))
    return model


def batch(B: int, L: int = 3, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised MLP inputs and targets `[B, L, d]` in float64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, d, generator=gen, dtype=F64), torch.randn(B, L, d, generator=gen, dtype=F64)


def dense_reconstruction(model: CrossLayerTranscoder, acts: torch.Tensor) -> torch.Tensor:
    """Reference decode: each source layer's activations times its decoder, written to layers s..L-1 (a CLT) or s
    alone (per-layer decoders), padded to all layers."""
    B, L, d, F = acts.shape[0], model.config.num_layers, model.config.d_model, model.num_local_features
    parts = []
    for s in range(L):
        T = L - s if model.config.decoders == "cross_layer" else 1
        partial = acts[:, s].to(model.W_dec[s].dtype) @ model.W_dec[s].reshape(F, T * d)
        parts.append(torch.nn.functional.pad(partial, (s * d, (L - s - T) * d)))
    return torch.stack(parts).sum(0).reshape(B, L, d) + model.b_dec


def param_grads(model: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------------------ jumprelu
def jumprelu_inputs(eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z spread over ±eps around a positive per-feature theta (so some inside, some outside the kernel), upstream g."""
    gen = torch.Generator().manual_seed(0)
    theta = 0.05 + 0.1 * torch.rand(3, 5, generator=gen, dtype=F64)
    z = theta + eps * (2 * torch.rand(8, 3, 5, generator=gen, dtype=F64) - 1)
    g = torch.randn(8, 3, 5, generator=gen, dtype=F64)
    return z, theta, g


def test_jumprelu_forward_and_straight_through_gradients_match_closed_form() -> None:
    eps = 0.1
    z0, theta0, g = jumprelu_inputs(eps)
    z, theta = z0.clone().requires_grad_(), theta0.clone().requires_grad_()
    out = JumpReLU.apply(z, theta, eps)
    assert torch.equal(out, z0 * (z0 > theta0).to(F64))
    out.backward(g)

    kernel = ((z0 - theta0).abs() < eps / 2).to(F64)
    assert 0 < kernel.mean() < 1  # both sides of the kernel window are exercised
    assert torch.equal(z.grad, g * (z0 > theta0).to(F64))
    torch.testing.assert_close(theta.grad, (-(theta0 / eps) * kernel * g).sum(0), rtol=1e-12, atol=1e-12)


def test_jumprelu_theta_gradient_is_derivative_of_rectangle_smoothed_jump() -> None:
    """The STE's theta-gradient is d/dθ of θ₀·S((z − θ)/ε) at θ = θ₀, S the ramp CDF of the rectangle kernel
    (the jump of height θ₀ smoothed over the bandwidth); checked by central differences."""
    eps, h = 0.1, 1e-6
    z, theta0, g = jumprelu_inputs(eps)
    theta = theta0.clone().requires_grad_()
    JumpReLU.apply(z, theta, eps).backward(g)

    def smoothed_jump(t: torch.Tensor) -> torch.Tensor:  # per feature [L, F], summed over the batch
        return (g * theta0 * ((z - t) / eps + 0.5).clamp(0, 1)).sum(0)

    numeric = (smoothed_jump(theta0 + h) - smoothed_jump(theta0 - h)) / (2 * h)
    assert numeric.abs().max() > 0
    torch.testing.assert_close(theta.grad, numeric, rtol=1e-6, atol=1e-8)


def test_jumprelu_log_threshold_gradient_is_chain_rule_through_exp() -> None:
    eps = 0.1
    z0, theta0, g = jumprelu_inputs(eps)
    log_threshold = theta0.log().requires_grad_()
    z = z0.clone().requires_grad_()
    jumprelu(z, log_threshold, eps).backward(g)

    theta = theta0.clone().requires_grad_()
    JumpReLU.apply(z0, theta, eps).backward(g)
    torch.testing.assert_close(log_threshold.grad, theta0 * theta.grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(z.grad, g * (z0 > theta0).to(F64))


# --------------------------------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize(
    ("per_batch", "scope", "k", "count"),
    [
        (False, "per_layer", 3.0, 3),  # per token and layer
        (False, "global", 4.0, 4),  # per token over all layers
        (True, "per_layer", 2.5, 15),  # round(k·B) per layer over the batch (B = 6)
        (True, "global", 2.5, 15),  # round(k·B) over everything
    ],
)
def test_select_topk_keeps_exactly_the_largest_entries(per_batch: bool, scope: str, k: float, count: int) -> None:
    B, L, F = 6, 3, 10

    def groups(t: torch.Tensor) -> torch.Tensor:
        """`[B, L, F]` -> `[G, N]`, one row per group the count applies to."""
        if per_batch:
            return t.transpose(0, 1).reshape(L, B * F) if scope == "per_layer" else t.reshape(1, B * L * F)
        return t.reshape(B * L, F) if scope == "per_layer" else t.reshape(B, L * F)

    def reference_mask(t: torch.Tensor) -> torch.Tensor:
        scores = groups(t)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(count, dim=1).indices, True)
        return mask.reshape(L, B, F).transpose(0, 1) if per_batch and scope == "per_layer" else mask.reshape(B, L, F)

    gen = torch.Generator().manual_seed(0)
    # All positive: the nonzero outputs are the selection itself.
    positive = torch.rand(B, L, F, generator=gen, dtype=F64) + 0.1
    out = select_topk(positive, k, per_batch, scope, FeatureShards())
    assert (groups(out != 0).sum(1) == count).all()
    assert torch.equal(out != 0, reference_mask(positive))
    assert torch.equal(out[out != 0], positive[out != 0])

    # Mixed signs: relu(z) on the selection, 0 elsewhere; gradients only where selected and z > 0.
    z = torch.randn(B, L, F, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(B, L, F, generator=gen, dtype=F64)
    mask = reference_mask(z.detach())
    out = select_topk(z, k, per_batch, scope, FeatureShards())
    assert torch.equal(out, torch.where(mask, z.detach().clamp_min(0), 0.0))
    out.backward(g)
    flows = mask & (z.detach() > 0)
    assert flows.any() and (~mask & (z.detach() > 0)).any()  # unselected positive entries get no gradient
    assert torch.equal(z.grad, torch.where(flows, g, 0.0))


# -------------------------------------------------------------------------------------------------------------- decode
def sparse_activations(B: int = 8, F: int = 12, seed: int = 0) -> torch.Tensor:
    """~30 % active, nonnegative, with rows 0 and 5 entirely zero."""
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand(B, F, generator=gen, dtype=F64) - 0.7).clamp_min(0)
    a[[0, 5]] = 0
    assert 0 < (a != 0).float().mean() < 0.5
    return a


def decode_with_grads(
    a0: torch.Tensor, W0: torch.Tensor, g: torch.Tensor, sparse: bool, grad_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, W = a0.clone().requires_grad_(), W0.clone().requires_grad_()
    out = decode(a, W, sparse, grad_mask)
    out.backward(g)
    return out.detach(), a.grad, W.grad


def test_sparse_decode_equals_dense_decode_in_values_and_gradients() -> None:
    a = sparse_activations()
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(12, 9, generator=gen, dtype=F64)
    g = torch.randn(8, 9, generator=gen, dtype=F64)
    out_s, ga_s, gW_s = decode_with_grads(a, W, g, sparse=True)
    out_d, ga_d, gW_d = decode_with_grads(a, W, g, sparse=False)

    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out_s, out_d, **tol)
    assert torch.equal(out_s[[0, 5]], torch.zeros(2, 9, dtype=F64))
    torch.testing.assert_close(gW_s, gW_d, **tol)
    active = a != 0
    torch.testing.assert_close(ga_s[active], ga_d[active], **tol)
    assert torch.equal(ga_s[~active], torch.zeros_like(ga_s[~active]))  # the dense g·Wᵀ is never formed


def test_sparse_decode_of_all_zero_activations_is_zero() -> None:
    a, W = torch.zeros(4, 6, dtype=F64), torch.randn(6, 5, dtype=F64)
    out, ga, gW = decode_with_grads(a, W, torch.ones(4, 5, dtype=F64), sparse=True)
    assert torch.equal(out, torch.zeros(4, 5, dtype=F64))
    assert torch.equal(gW, torch.zeros_like(gW)) and torch.equal(ga, torch.zeros_like(ga))


def test_sparse_decode_grad_mask_gives_zero_entries_their_dense_gradient() -> None:
    a = sparse_activations()
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(12, 9, generator=gen, dtype=F64)
    g = torch.randn(8, 9, generator=gen, dtype=F64)
    grad_mask = torch.rand(8, 12, generator=gen) < 0.3
    assert (grad_mask & (a == 0)).any() and (grad_mask & (a != 0)).any()
    out_s, ga_s, gW_s = decode_with_grads(a, W, g, sparse=True, grad_mask=grad_mask)
    out_d, ga_d, gW_d = decode_with_grads(a, W, g, sparse=False)

    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out_s, out_d, **tol)
    torch.testing.assert_close(gW_s, gW_d, **tol)
    pattern = (a != 0) | grad_mask
    torch.testing.assert_close(ga_s[pattern], ga_d[pattern], **tol)
    assert torch.equal(ga_s[~pattern], torch.zeros_like(ga_s[~pattern]))


# -------------------------------------------------------------------------------------------------------- whole model
LOSS_KW = {"sparsity_lambda": 0.1, "preactivation_coef": 0.01}
MODEL_TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("decoders", DECODERS)
@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_model_sparse_decode_equals_dense_decode(activation: str, decoders: str) -> None:
    """sparse_decode_density 1.0 (always sparse here) and 0.0 (always dense) give the same outputs and gradients."""
    x, y = batch(16)
    results = []
    for density in (1.0, 0.0):
        model = make_model(activation, randomise_biases=True, sparse_decode_density=density, decoders=decoders)
        out = model(x)
        clt_loss(model, out, y, **LOSS_KW).total.backward()
        results.append((out, param_grads(model)))
    (out_s, grads_s), (out_d, grads_d) = results

    active = (out_s.activations != 0).float().mean()
    assert 0 < active < 1
    if activation == "jumprelu":  # zero entries whose threshold gradient the sparse path must keep
        near = (out_s.preactivations - model.threshold).abs() < model.config.jumprelu_bandwidth / 2
        assert (near & (out_s.activations == 0)).any()
    torch.testing.assert_close(out_s.reconstruction, out_d.reconstruction, **MODEL_TOL)
    assert torch.equal(out_s.activations, out_d.activations)
    assert grads_s.keys() == grads_d.keys()
    for name in grads_s:
        assert grads_s[name].abs().max() > 0, name
        torch.testing.assert_close(grads_s[name], grads_d[name], **MODEL_TOL, msg=name)


@pytest.mark.parametrize("decoders", DECODERS)
@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_topk_model_sparse_decode_equals_manual_dense_reconstruction(activation: str, decoders: str) -> None:
    x, y = batch(16)
    model = make_model(activation, randomise_biases=True, decoders=decoders)
    out = model(x)
    clt_loss(model, out, y, **LOSS_KW).total.backward()
    grads = param_grads(model)
    model.zero_grad()

    ref = model(x)
    manual = CLTOutput(dense_reconstruction(model, ref.activations), ref.activations, ref.preactivations)
    clt_loss(model, manual, y, **LOSS_KW).total.backward()
    torch.testing.assert_close(out.reconstruction, manual.reconstruction.detach(), **MODEL_TOL)
    for name, p in model.named_parameters():
        assert grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], p.grad, **MODEL_TOL, msg=name)


@pytest.mark.parametrize("decoders", DECODERS)
def test_float64_model_reconstructs_at_float64_precision(decoders: str) -> None:
    x, _ = batch(16)
    model = make_model("relu", randomise_biases=True, decoders=decoders)
    out = model(x)
    torch.testing.assert_close(out.reconstruction, dense_reconstruction(model, out.activations), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------- parameters, init
@pytest.mark.parametrize("decoders", DECODERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_parameter_shapes_and_layout(activation: str, decoders: str) -> None:
    L, d, F = 3, 4, 16
    model = make_model(activation, L=L, d=d, F=F, jumprelu_threshold=0.05, decoders=decoders)
    assert model.W_enc.shape == (L, F, d)
    assert model.b_enc.shape == (L, F)
    targets = [L - s if decoders == "cross_layer" else 1 for s in range(L)]
    assert [tuple(w.shape) for w in model.W_dec] == [(F, targets[s], d) for s in range(L)]
    assert model.decoder_targets == [range(s, s + targets[s]) for s in range(L)]
    assert model.b_dec.shape == (L, d)
    assert not model.b_enc.any() and not model.b_dec.any()
    assert model.decoder_norms().shape == (L, F)
    if activation == "jumprelu":
        assert model.log_threshold.shape == (L, F)
        torch.testing.assert_close(model.threshold, torch.full((L, F), 0.05, dtype=F64))
    else:
        assert model.log_threshold is None
        assert "log_threshold" not in dict(model.named_parameters())
        assert torch.equal(model.threshold, torch.zeros(L, F, dtype=F64))


@pytest.mark.parametrize("decoders", DECODERS)
def test_init_is_uniform_within_the_circuit_tracing_bounds(decoders: str) -> None:
    """W_dec ~ U(±1/√(S·d)), S the layers writing to the last layer: L for a CLT, 1 for per-layer decoders."""
    L, d, F = 3, 16, 128
    model = make_model("relu", L=L, d=d, F=F, dtype=torch.float32, decoders=decoders)
    W_dec = torch.cat([w.flatten() for w in model.W_dec])
    dec_bound = 1 / math.sqrt((L if decoders == "cross_layer" else 1) * d)
    for weights, bound in ((model.W_enc.detach().flatten(), 1 / math.sqrt(F)), (W_dec.detach(), dec_bound)):
        assert weights.abs().max() <= bound
        assert weights.abs().max() > 0.99 * bound  # fills the range
        assert abs(weights.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
        assert abs(weights.mean().item()) < 0.05 * bound
    assert not torch.equal(model.W_enc[0], model.W_enc[1])  # each layer draws its own weights


@pytest.mark.parametrize("decoders", DECODERS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_init_concatenates_to_the_single_process_weights(world_size: int, decoders: str) -> None:
    """F = 192 spans three 64-feature init blocks; shard boundaries fall inside them for both world sizes."""
    kw: dict[str, Any] = {"L": 3, "d": 4, "F": 192, "dtype": torch.float32, "seed": 7, "decoders": decoders}
    full = make_model("jumprelu", **kw)
    ranks = [make_model("jumprelu", shards=FeatureShards(r, world_size), **kw) for r in range(world_size)]
    per_rank = 192 // world_size
    assert [m.feature_range for m in ranks] == [(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]
    assert torch.equal(torch.cat([m.W_enc for m in ranks], dim=1), full.W_enc)
    assert torch.equal(torch.cat([m.b_enc for m in ranks], dim=1), full.b_enc)
    assert torch.equal(torch.cat([m.log_threshold for m in ranks], dim=1), full.log_threshold)
    for s in range(3):
        assert torch.equal(torch.cat([m.W_dec[s] for m in ranks], dim=0), full.W_dec[s])
    for m in ranks:
        assert torch.equal(m.b_dec, full.b_dec)


def test_init_depends_on_the_seed() -> None:
    a, b = make_model("relu", seed=0), make_model("relu", seed=1)
    assert not torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_dec[0], b.W_dec[0])
    assert torch.equal(a.W_enc, make_model("relu", seed=0).W_enc)


def test_features_not_divisible_by_world_size_are_refused() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        make_model("relu", F=10, shards=FeatureShards(0, 4))


# -------------------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loss_terms_do_not_depend_on_batch_size(activation: str) -> None:
    """A batch concatenated with itself gives the same loss values (batchtopk: k·B doubles, the selection holds)."""
    x, y = batch(8)
    model = make_model(activation, randomise_biases=True)
    with torch.no_grad():
        out1, out2 = model(x), model(torch.cat([x, x]))
        terms1 = clt_loss(model, out1, y, **LOSS_KW)
        terms2 = clt_loss(model, out2, torch.cat([y, y]), **LOSS_KW)
    assert torch.equal(out2.activations, torch.cat([out1.activations, out1.activations]))
    for name in ("reconstruction", "sparsity", "preactivation", "total"):
        v1, v2 = getattr(terms1, name), getattr(terms2, name)
        assert v1 > 0, name
        torch.testing.assert_close(v2, v1, rtol=1e-6, atol=0, msg=name)


def test_auxk_is_zero_without_dead_features() -> None:
    x, y = batch(8)
    model = make_model("batchtopk")
    out = model(x)
    dead = torch.zeros(3, 16, dtype=torch.bool)
    terms = clt_loss(model, out, y, dead_mask=dead, auxk_coef=1 / 32, auxk_k=4)
    assert terms.auxk == 0 and terms.total == terms.reconstruction
    assert clt_loss(model, out, y, auxk_coef=1 / 32).auxk == 0  # no mask at all


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_auxk_is_positive_and_trains_only_dead_features(activation: str) -> None:
    x, y = batch(8)
    model = make_model(activation, randomise_biases=True)
    out = model(x)
    dead = torch.zeros(3, 16, dtype=torch.bool)
    dead[:, ::3] = True
    terms = clt_loss(model, out, y, dead_mask=dead, auxk_coef=1 / 32, auxk_k=4)
    assert terms.auxk > 0
    torch.testing.assert_close(terms.total, terms.reconstruction + terms.auxk)
    terms.auxk.backward()

    enc_rows = model.W_enc.grad.abs().sum(-1)  # [L, F]
    assert enc_rows[dead].sum() > 0
    assert not enc_rows[~dead].any() and not model.b_enc.grad[~dead].any()
    dec_rows = torch.stack([model.W_dec[s].grad.flatten(1).abs().sum(1) for s in range(3)])
    assert dec_rows[dead].sum() > 0 and not dec_rows[~dead].any()
    assert model.b_dec.grad is None or not model.b_dec.grad.any()  # auxk decodes without the bias


# -------------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_per_layer_k_is_bounded_by_the_features_per_layer(activation: str) -> None:
    base = {"num_layers": 4, "d_model": 3, "num_features": 8, "activation_fn": activation}
    assert CLTConfig.from_dict({**base, "k": 8}).k == 8
    with pytest.raises(ConfigError, match="k=9"):
        CLTConfig.from_dict({**base, "k": 9})
    assert CLTConfig.from_dict({**base, "activation_fn": "relu", "k": 9}).k == 9  # k is unused without top-k


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_global_k_above_all_features_is_refused(activation: str) -> None:
    base = {"num_layers": 4, "d_model": 3, "num_features": 8, "activation_fn": activation, "topk_scope": "global"}
    with pytest.raises(ConfigError):
        CLTConfig.from_dict({**base, "k": 33})


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_global_k_may_exceed_the_features_of_one_layer(activation: str) -> None:
    """With `global` scope k counts over all L·F features of a token, so F < k <= L·F is valid (and works)."""
    base = {"num_layers": 4, "d_model": 3, "num_features": 8, "activation_fn": activation, "topk_scope": "global"}
    cfg = CLTConfig.from_dict({**base, "k": 12})
    model = CrossLayerTranscoder(cfg, dtype=F64)
    acts = model(torch.randn(5, 4, 3, dtype=F64)).activations
    assert ((acts != 0).sum() <= 12 * 5).item()


def test_per_layer_k_is_checked_before_num_layers_is_known() -> None:
    with pytest.raises(ConfigError):
        CLTConfig.from_dict({"num_features": 8, "activation_fn": "topk", "k": 9})


def test_unknown_config_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key 'kk'"):
        CLTConfig.from_dict({"num_layers": 2, "d_model": 3, "num_features": 8, "kk": 4})


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_layer_at_a_time_equals_the_whole_forward_pass(activation: str) -> None:
    """encode_layer → activate_layer → decode_layer, layer by layer (as spliced-in evaluation runs the model),
    reproduce the all-layer forward pass (per-layer k for topk/batchtopk)."""
    torch.manual_seed(0)
    model = make_model(activation, randomise_biases=True)
    x = torch.randn(8, 3, 4, dtype=F64)
    out = model(x)
    L, d = 3, 4
    recon = torch.zeros(8, L, d, dtype=F64)
    for layer in range(L):
        acts = model.activate_layer(layer, model.encode_layer(layer, x[:, layer]))
        torch.testing.assert_close(acts, out.activations[:, layer])
        recon[:, layer:] += model.decode_layer(layer, acts).reshape(8, L - layer, d)
    torch.testing.assert_close(recon + model.b_dec, out.reconstruction)


def test_a_global_k_has_no_one_layer_activation() -> None:
    model = make_model("topk", topk_scope="global")
    with pytest.raises(ConfigError, match="global k"):
        model.activate_layer(0, torch.randn(2, 16, dtype=F64))


def test_the_sampled_floor_of_a_long_row_sees_every_feature() -> None:
    """batchtopk's long rows are token-major runs of F features: a floor sampled with a stride that is a multiple of
    the feature count would see only a few features, and miss the winners when they are elsewhere (as after
    training has told the features apart); the sample must cover them all."""
    from clt_core.model.activations import positions_above_floor

    B, F, count = 2048, 512, 2048 * 4
    z = torch.randn(B, F) * 0.01
    z[:, 1::2] += 1.0  # the odd features win, and most sampled positions of an even stride are even
    positions = positions_above_floor(z.reshape(-1), count)
    assert positions is not None and len(positions) >= count
    assert len(positions) < 2 * count  # and the floor is still close: few more than needed are ranked
