"""PNG plots of an evaluation: NMSE and L0 per layer, thresholds per layer, training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clt_core.errors import ConfigError
from clt_core.model.clt import CrossLayerTranscoder

__all__ = ["plot_feature_density", "plot_layer_metrics", "plot_thresholds", "plot_training_curves"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_metrics(metrics: dict[str, Any], path: Path) -> Path:
    """NMSE and L0 per layer, side by side."""
    plt = _pyplot()
    layers = range(len(metrics["nmse"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar(layers, metrics["nmse"], color="tab:blue")
    left.set(xlabel="layer", ylabel="NMSE", title=f"NMSE per layer (mean {metrics['mean_nmse']:.3f})")
    right.bar(layers, metrics["l0"], color="tab:orange")
    right.set(
        xlabel="layer", ylabel="active features per token", title=f"L0 per layer (total {metrics['total_l0']:.1f})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_thresholds(model: CrossLayerTranscoder, path: Path, silent_above: float = 1e5) -> Path:
    """Histogram of log10 JumpReLU thresholds per layer (features at the never-selected default left out)."""
    if model.log_threshold is None:
        raise ConfigError(f"a {model.config.activation_fn} model has no thresholds to plot")
    plt = _pyplot()
    theta = model.threshold.detach().double().cpu()
    L = theta.shape[0]
    live = theta[theta < silent_above]
    lo, hi = (float(live.min().log10()), float(live.max().log10())) if live.numel() else (-3.0, 0.0)
    bins = torch.linspace(lo, hi + 1e-9, 50).numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    for layer in range(L):
        values = theta[layer][theta[layer] < silent_above].log10().numpy()
        ax.hist(values, bins=bins, histtype="step", color=cmap(layer / max(L - 1, 1)),
                label=f"layer {layer}" if L <= 12 else None)  # fmt: skip
    silent = int((theta >= silent_above).sum())
    ax.set(xlabel="log10 threshold", ylabel="features", title=f"JumpReLU thresholds per layer ({silent} silent)")
    if L <= 12:
        ax.legend(fontsize=7)
    else:  # too many layers for a legend: a colour scale
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(Normalize(0, L - 1), cmap), ax=ax, label="layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_curves(metrics_jsonl: Path, path: Path) -> Path:
    """Loss terms and held-out NMSE over steps, from a run's metrics.jsonl."""
    plt = _pyplot()
    series: dict[str, list[tuple[int, float]]] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        record = json.loads(line)
        step = record.get("step")
        for key, value in record.items():
            wanted = key.startswith("loss/") or key in ("eval/mean_nmse", "eval/total_l0")
            if step is not None and wanted and isinstance(value, int | float) and value > 0:
                series.setdefault(key, []).append((step, float(value)))
    if not series:
        raise ConfigError(f"{metrics_jsonl}: no loss or evaluation metrics to plot")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in sorted(series.items()):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=key, marker="o" if len(points) < 5 else None)
    ax.set(xlabel="step", yscale="log", title="training curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_feature_density(density: torch.Tensor, path: Path) -> Path:
    """Histogram of log10 firing frequency per layer (dead features counted at the left edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = density.shape[0]
    floor = 1e-7
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = torch.linspace(-7, 0, 57).tolist()
    for layer in range(L):
        values = density[layer].clamp_min(floor).log10().numpy()
        ax.hist(values, bins=bins, histtype="step", label=f"layer {layer}" if L <= 12 else None)
    dead = float((density == 0).double().mean())
    ax.set(xlabel="log10 fraction of held-out tokens a feature fires on", ylabel="features")
    ax.set_title(f"feature density per layer ({dead:.1%} dead, at the left edge)")
    if L <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
