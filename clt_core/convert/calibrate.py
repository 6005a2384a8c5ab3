"""Layer-wise L0 calibration: scale each layer's thresholds so the JumpReLU model fires, on a fixed sample, as often
per token as the batchtopk/topk model it came from.

L0 of a layer is monotone in a common scale s of its thresholds (a feature fires when pre > s·θ, i.e. when
pre/θ > s), so the search is exact rather than a bisection: with the ratios pre/θ of the sample sorted, s sits
halfway between the m-th and (m+1)-th largest, m = round(target L0 · tokens). No randomness: the same sample gives
the same scales.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def layer_scales(pre: torch.Tensor, theta: torch.Tensor, target_l0: torch.Tensor) -> torch.Tensor:
    """Scales `[L]` such that `(pre[:, l] > scale_l · theta[l]).sum(-1).mean() ≈ target_l0[l]`.

    `pre [N, L, F]` pre-activations of the sample, `theta [L, F]` positive thresholds, `target_l0 [L]`."""
    N, L, _ = pre.shape
    scales = torch.ones(L, dtype=torch.float64)
    for layer in range(L):
        ratios = (pre[:, layer].double() / theta[layer].double()).flatten()
        positive = int((ratios > 0).sum())
        want = min(round(float(target_l0[layer]) * N), positive)
        if positive == 0:
            continue  # nothing can fire at any positive scale
        if want == 0:
            scales[layer] = float(ratios.max()) * 2  # above every ratio: the layer stays silent
            continue
        top = ratios.topk(min(want + 1, ratios.numel())).values
        upper = float(top[want - 1])
        lower = float(top[want]) if want < top.numel() and float(top[want]) > 0 else 0.0
        scales[layer] = (upper + lower) / 2 if lower > 0 else upper / 2
    return scales


@torch.no_grad()
def l0_per_layer(pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Mean active features per token and layer of a JumpReLU with thresholds `theta [L, F]`."""
    return (pre > theta).sum(dim=-1).double().mean(dim=0)
