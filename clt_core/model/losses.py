"""Training losses on normalised activations, and the metrics reported on held-out data.

- reconstruction: Σ_l MSE(ŷ_l, y_l), the mean over tokens and dimensions of each layer, summed over layers;
- sparsity: λ·mean_tokens Σ_features tanh(c·a·‖W_dec,f‖), the norm over the feature's decoders to all its targets.
  A mean over tokens, so λ means the same at any batch size;
- pre-activation: coef·mean_tokens Σ_features relu(θ − z)·‖W_dec,f‖ (θ = 0 without a threshold), which nudges
  features that never fire back towards their threshold;
- auxk (topk/batchtopk): the dead features' top `k_aux` pre-activations per token, decoded, predict the residual
  y − ŷ; loss coef·‖e − ê‖²/‖e‖². It reuses the forward's pre-activations: no second encoder pass.
Sums over features are local to a feature shard; `LossTerms.total` is what each rank backpropagates (the shared
reconstruction term is identical on every rank), `reduced` gives the global values for logging.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from clt_core.model.activations import select_topk
from clt_core.model.clt import CLTOutput, CrossLayerTranscoder


class LossTerms(NamedTuple):
    total: torch.Tensor
    """What this rank backpropagates."""
    reconstruction: torch.Tensor
    sparsity: torch.Tensor
    """This rank's features' part (sum over ranks for the global value)."""
    preactivation: torch.Tensor
    """This rank's features' part."""
    auxk: torch.Tensor


def clt_loss(
    model: CrossLayerTranscoder,
    out: CLTOutput,
    targets: torch.Tensor,
    *,
    sparsity_lambda: float = 0.0,
    sparsity_c: float = 1.0,
    preactivation_coef: float = 0.0,
    dead_mask: torch.Tensor | None = None,
    auxk_coef: float = 0.0,
    auxk_k: int = 512,
) -> LossTerms:
    """Loss terms of one batch; `dead_mask [L, F_local]` marks features that have not fired lately (for auxk)."""
    zero = torch.zeros((), device=targets.device)
    acts, pre = _upcast(out.activations), _upcast(out.preactivations)
    error = out.reconstruction - _upcast(targets)
    reconstruction = error.pow(2).mean(dim=(0, 2)).sum()
    sparsity = preactivation = auxk = zero
    if sparsity_lambda > 0 or preactivation_coef > 0:
        norms = model.decoder_norms()
        if sparsity_lambda > 0:
            sparsity = sparsity_lambda * torch.tanh(sparsity_c * acts * norms).sum(dim=(1, 2)).mean()
        if preactivation_coef > 0:
            gap = (model.threshold - pre).clamp_min(0)
            preactivation = preactivation_coef * (gap * norms).sum(dim=(1, 2)).mean()
    if auxk_coef > 0 and dead_mask is not None:  # not `dead_mask.any()`: that is local, and _auxk holds collectives
        auxk = auxk_coef * _auxk(model, out, error.detach(), dead_mask, auxk_k)
    return LossTerms(reconstruction + sparsity + preactivation + auxk, reconstruction, sparsity, preactivation, auxk)


def _auxk(model: CrossLayerTranscoder, out: CLTOutput, error: torch.Tensor, dead: torch.Tensor, k: int) -> torch.Tensor:
    """Normalised error of predicting the residual from the dead features' top-k pre-activations per token."""
    shards = model.shards
    dead_count = shards.all_reduce(dead.sum().to(torch.float64)).item()
    k = int(min(k, dead_count))
    if k == 0:
        return torch.zeros((), device=error.device)
    masked = _upcast(out.preactivations).masked_fill(~dead, float("-inf"))
    acts = select_topk(masked, k, per_batch=False, scope="global", shards=shards)
    predicted = model.decode(acts.nan_to_num(0.0), bias=False)
    residual = -error  # targets - reconstruction
    return (predicted - residual).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-12)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/f16 (autocast) values to float32 for the loss; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
