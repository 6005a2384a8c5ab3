"""The reconstruction metrics of a CLT over batches of normalised rows: NMSE, explained variance and L0 per layer,
dead fraction and feature density. Training's evaluation, convert and evaluate all compute them here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from clt_core.model.clt import CrossLayerTranscoder


@torch.no_grad()
def reconstruction_metrics(
    model: CrossLayerTranscoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu"
) -> dict[str, Any]:
    """NMSE, explained variance and L0 per layer, dead fraction and feature density over (inputs, targets) batches
    of normalised rows."""
    L = model.num_layers
    # Sums stay on `device` until the end: one transfer, not a host sync per batch. Firing is counted in integers
    # (exact, like the float64 sums of 0/1 it replaces, without a float64 copy of the activations per batch).
    sums = torch.zeros(4, L, dtype=torch.float64, device=device)  # squared error, error, y, y²
    fired = torch.zeros(L, model.num_local_features, dtype=torch.int64, device=device)
    rows = 0
    d = model.d_model
    for inputs, targets in batches:
        x = inputs.to(device, torch.float32)
        y = targets.to(device, torch.float32)
        out = model(x)
        err = (out.reconstruction - y).double()
        y64 = y.double()
        sums[0] += err.pow(2).sum(dim=(0, 2))
        sums[1] += err.sum(dim=(0, 2))
        sums[2] += y64.sum(dim=(0, 2))
        sums[3] += y64.pow(2).sum(dim=(0, 2))
        fired += (out.activations != 0).sum(dim=0)
        rows += x.shape[0]
    sq_err, err_sum, sum_y, sum_y2 = sums.cpu()
    fired = fired.cpu().double()
    active = fired.sum(dim=1)
    shards = model.shards
    shards.all_reduce(active)
    n = rows * d
    var_y = sum_y2 / n - (sum_y / n) ** 2
    var_err = sq_err / n - (err_sum / n) ** 2
    nmse = (sq_err / n) / var_y.clamp_min(1e-12)
    density = shards.all_gather_cat(fired / max(rows, 1), dim=1)  # [L, F]
    return {
        "rows": rows,
        "nmse": nmse.tolist(),
        "explained_variance": (1 - var_err / var_y.clamp_min(1e-12)).tolist(),
        "l0": (active / max(rows, 1)).tolist(),
        "mean_nmse": float(nmse.mean()),
        "total_l0": float(active.sum() / max(rows, 1)),
        "dead_fraction": float((density == 0).double().mean()),
        "feature_density": density,
    }
