"""Per-feature JumpReLU thresholds from a batchtopk/topk model: what pre-activation a feature needs to be selected.

Two estimators, from the same pass over the data (`ThresholdStats` gathers what both need):
- `min_mean` (direct, per feature): the mean over batches of the smallest pre-activation at which the feature was
  selected in that batch.
- `standardized` (the seed library's, after the BatchTopK paper): per batch, each feature's smallest selected
  pre-activation is standardised by that feature's batch mean and std of pre-activations; z*_l is the mean standard
  score over the layer's features and batches, and θ = z*_l·σ̄ + μ̄ with σ̄, μ̄ the feature's mean batch std and mean.
Features never selected get `default_theta` (they stay silent, as they were).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

from clt_core.errors import ConfigError
from clt_core.model.clt import CrossLayerTranscoder

Estimator = Literal["min_mean", "standardized"]
ESTIMATORS: tuple[Estimator, ...] = ("min_mean", "standardized")
MIN_THETA = 1e-6
"""Thresholds are stored as logs: a feature selected at non-positive pre-activations gets this floor."""


class ThresholdStats:
    """Running sums over batches, in float64, of what the estimators need (`[L, F]` each)."""

    def __init__(self, num_layers: int, num_features: int) -> None:
        shape = (num_layers, num_features)
        self.sum_min = torch.zeros(shape, dtype=torch.float64)
        self.times_selected = torch.zeros(shape, dtype=torch.float64)
        self.sum_mean = torch.zeros(shape, dtype=torch.float64)
        self.sum_std = torch.zeros(shape, dtype=torch.float64)
        self.sum_z = torch.zeros(num_layers, dtype=torch.float64)
        self.count_z = torch.zeros(num_layers, dtype=torch.float64)
        self.batches = 0

    @torch.no_grad()
    def update(self, pre: torch.Tensor, selected: torch.Tensor) -> None:
        """One batch: pre-activations `[B, L, F]` and the mask of selected (active) entries."""
        pre = pre.double()
        smallest = torch.where(selected, pre, torch.inf).amin(dim=0)
        fired = torch.isfinite(smallest)
        mean, std = pre.mean(dim=0), pre.std(dim=0, correction=0).clamp_min(1e-6)
        self.sum_min += torch.where(fired, smallest, 0)
        self.times_selected += fired
        self.sum_mean += mean
        self.sum_std += std
        z = torch.where(fired, (smallest - mean) / std, 0)
        self.sum_z += z.sum(dim=1)
        self.count_z += fired.sum(dim=1)
        self.batches += 1

    def thresholds(self, estimator: Estimator, default_theta: float) -> torch.Tensor:
        """θ `[L, F]` (float32) by the chosen estimator."""
        if self.batches == 0:
            raise ConfigError("no batches to estimate thresholds from")
        fired = self.times_selected > 0
        if estimator == "min_mean":
            theta = self.sum_min / self.times_selected.clamp_min(1)
        elif estimator == "standardized":
            z_star = self.sum_z / self.count_z.clamp_min(1)
            theta = z_star[:, None] * self.sum_std / self.batches + self.sum_mean / self.batches
        else:
            raise ConfigError(f"unknown threshold estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        theta = torch.where(fired, theta.clamp_min(MIN_THETA), default_theta)
        return theta.float()


@torch.no_grad()
def threshold_stats(model: CrossLayerTranscoder, batches: Iterable[torch.Tensor]) -> ThresholdStats:
    """Run the batchtopk/topk model's selection over batches of normalised inputs `[B, L, d]`."""
    if model.config.activation_fn not in ("batchtopk", "topk"):
        raise ConfigError(
            f"thresholds are estimated from a batchtopk or topk model; this one is {model.config.activation_fn}"
        )
    stats = ThresholdStats(model.num_layers, model.num_local_features)
    for x in batches:
        pre = model.encode(x.float())
        stats.update(pre, model.activate(pre) != 0)
    return stats


def threshold_statistics(theta: torch.Tensor, silent_above: float = 1e5) -> list[dict[str, float]]:
    """Per layer: quantiles of the thresholds of the features that can fire, and how many are silent (θ at the
    never-selected default or above `silent_above`)."""
    names = ("min", "p10", "median", "p90", "max")
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    rows = []
    for layer, values in enumerate(theta.double()):
        live = values[values < silent_above]
        quantiles = live.quantile(levels).tolist() if live.numel() else [math.nan] * len(names)
        mean = float(live.mean()) if live.numel() else math.nan
        silent = int((values >= silent_above).sum())
        rows.append({"layer": layer, "silent": silent, "mean": mean, **dict(zip(names, quantiles, strict=True))})
    return rows
