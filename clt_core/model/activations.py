"""Feature activations. All act on pre-activations `[B, L, F_local]` (this rank's features of every layer).

- `jumprelu`: z·H(z − θ) with θ = exp(log θ) per layer and feature. Straight-through estimator of the JumpReLU paper
  (Rajamanoharan et al. 2024): the gradient to z is H(z − θ); the jump's pseudo-derivative to θ is
  −(θ/ε)·K((z − θ)/ε), with K the rectangle kernel 1{|u| < 1/2} and ε the bandwidth.
- `relu`: max(z, 0).
- `batchtopk`: the k·B largest pre-activations of the batch (per layer, or over all layers with `global` scope) keep
  relu(z); the rest are 0. `topk`: the same per token.
The top-k selection is a threshold: the count-th largest value over all ranks (each rank contributes its own
count largest candidates, which must contain the global ones), so the selected set is the same whatever the number
of feature shards. Exactly `count` entries are selected unless values tie at the threshold.
"""

from __future__ import annotations

from typing import Any

import torch

from clt_core.model.parallel import FeatureShards


class JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta).to(grad.dtype)
        kernel = ((z - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(theta / eps) * kernel * grad
        # theta broadcasts over the batch: sum the batch dimensions back out.
        grad_theta = grad_theta.sum_to_size(theta.shape)
        return grad_z, grad_theta, None


def jumprelu(z: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """`z [B, L, F]`, `log_threshold [L, F]`."""
    return JumpReLU.apply(z, log_threshold.exp().to(z.dtype), bandwidth)


def is_long_row(length: int, count: int) -> bool:
    """Whether picking the `count` largest of `length` values is worth `positions_above_floor` instead of `topk`."""
    return length > 65536 and count <= length // 8


def positions_above_floor(row: torch.Tensor, count: int) -> torch.Tensor | None:
    """Positions (ascending) of the entries of a long `row` at or above a floor a little below its `count`-th largest
    value, in one pass over the row; None when the sample was unlucky (fewer than `count` entries above it).

    For long rows (batchtopk ranks up to B·L·F values) a full `topk` is slow on CPU; instead a strided sample of the
    row gives the floor, and only the ~20 % more than `count` entries above it are ranked. The stride is odd: rows are
    token-major runs of F features (a power of two, as a rule), and an even stride would sample only a few features
    of each token, whose values are no guide to the rest once training has told the features apart."""
    stride = sample_stride(len(row))
    positions = (row >= floor_of_sample(row[::stride], stride, count)).nonzero().squeeze(1)
    return positions if len(positions) >= count else None


def sample_stride(length: int) -> int:
    """The stride of `positions_above_floor`'s sample of a row of `length` (~16k samples; odd, see there)."""
    return (length // 16384) | 1


def floor_of_sample(sample: torch.Tensor, stride: int, count: int) -> float:
    """A value a little below the `count`-th largest of a row, from every `stride`-th entry of it: ~20 % (and 16
    samples) more than `count` entries are expected at or above it."""
    rank = min(len(sample) - 1, int(count / stride * 1.2) + 16)  # 0-based, from the largest
    return float(sample.kthvalue(len(sample) - rank).values)  # a selection, not a sort of the sample


def largest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` largest values of each row of `scores [G, N]`, unordered, `[G, count]` (long rows ranked through
    `positions_above_floor`, falling back to a plain `topk` when its sample was unlucky)."""
    if not is_long_row(scores.shape[1], count):
        return scores.topk(count, dim=1, sorted=False).values
    out = []
    for row in scores:
        positions = positions_above_floor(row, count)
        out.append((row if positions is None else row[positions]).topk(count, sorted=False).values)
    return torch.stack(out)


def topk_mask(scores: torch.Tensor, count: int, shards: FeatureShards) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the `count` largest entries of each row of `scores [G, N_local]`, ranked over all ranks' entries,
    and the threshold of each row `[G, 1]` (the count-th largest value)."""
    candidates = largest(scores, min(count, scores.shape[1]))
    if shards.world_size == 1:
        threshold = candidates.min(dim=1, keepdim=True).values
    else:
        candidates = shards.all_gather_cat(candidates, dim=1)
        threshold = candidates.topk(count, dim=1).values[:, -1:]
    return scores >= threshold, threshold


def select_topk(z: torch.Tensor, k: float, per_batch: bool, scope: str, shards: FeatureShards) -> torch.Tensor:
    """batchtopk (`per_batch`) or topk activations of `z [B, L, F_local]`: relu(z) where selected, else 0."""
    B, L, F = z.shape
    if per_batch and scope == "per_layer":  # k·B per layer over the batch
        scores, count = z.transpose(0, 1).reshape(L, B * F), round(k * B)
    elif per_batch:  # k·B over every layer of the batch
        scores, count = z.reshape(1, B * L * F), round(k * B)
    elif scope == "per_layer":  # k per token and layer
        scores, count = z.reshape(B * L, F), round(k)
    else:  # k per token over all layers
        scores, count = z.reshape(B, L * F), round(k)
    mask, threshold = topk_mask(scores.detach(), max(count, 1), shards)
    layer_major = per_batch and scope == "per_layer"
    mask = mask.reshape(L, B, F).transpose(0, 1) if layer_major else mask.reshape(B, L, F)
    if bool((threshold <= 0).any()):  # some selected values may be negative: they become 0
        mask = mask & (z.detach() > 0)
    return z * mask.to(z.dtype)  # one conversion, saved for the backward (a bool mask is converted twice)
