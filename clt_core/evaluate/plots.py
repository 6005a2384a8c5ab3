"""PNG plots of an evaluation: NMSE and L0 per layer, thresholds per layer, training curves. Every axis shows one
quantity, labelled with its unit; quantities that share an x axis are panels of one figure that share it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clt_core.errors import ConfigError
from clt_core.model.clt import CrossLayerTranscoder

__all__ = [
    "plot_feature_density",
    "plot_layer_metrics",
    "plot_thresholds",
    "plot_training_curves",
    "training_curves_figure",
]


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
    left.set(xlabel="layer", ylabel="NMSE (MSE / variance)", title=f"NMSE per layer (mean {metrics['mean_nmse']:.3f})")
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


# The panels of the training curves: one quantity each (title, y label, y scale, the metrics.jsonl keys drawn).
_CURVE_PANELS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("training loss, per term", "loss (normalised units)", "log", ("loss/",)),
    ("held-out NMSE", "NMSE (MSE / variance)", "log", ("eval/mean_nmse", "eval/nmse/layer_")),
    ("L0", "active features per token", "linear", ("eval/total_l0", "l0/total")),
)
_CURVE_LABELS = {"eval/mean_nmse": "mean over layers", "eval/total_l0": "held-out", "l0/total": "training batches"}


def _read_curves(metrics_jsonl: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the keys the panels draw, from a run's metrics.jsonl (non-positive values left out
    of the log-scale panels)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        record = json.loads(line)
        step = record.get("step")
        if step is None:
            continue
        for key, value in record.items():
            panel = next((p for p in _CURVE_PANELS if any(key.startswith(k) for k in p[3])), None)
            if panel is None or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if value > 0 or (panel[2] == "linear" and value == 0):
                series.setdefault(key, []).append((step, float(value)))
    return series


def training_curves_figure(metrics_jsonl: Path) -> Any:
    """The figure of `plot_training_curves` (matplotlib's): one panel per quantity that the run logged, stacked on
    a shared step axis."""
    plt = _pyplot()
    series = _read_curves(metrics_jsonl)
    if not series:
        raise ConfigError(f"{metrics_jsonl}: no loss or evaluation metrics to plot")
    panels = [(p, sorted(k for k in series if any(k.startswith(w) for w in p[3]))) for p in _CURVE_PANELS]
    panels = [(p, keys) for p, keys in panels if keys]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 1.2 + 2.3 * len(panels)), squeeze=False)
    for ax, ((title, ylabel, scale, _), keys) in zip(axes[:, 0], panels, strict=True):
        per_layer = [k for k in keys if k.startswith("eval/nmse/layer_")]
        for key in keys:
            steps, values = zip(*series[key], strict=True)
            marker = "o" if len(steps) < 5 else None
            if key in per_layer:  # thin, and labelled only while a legend stays readable
                label = f"layer {key.rsplit('_', 1)[1]}" if len(per_layer) <= 8 else None
                ax.plot(steps, values, label=label, linewidth=0.8, alpha=0.6, marker=marker, markersize=3)
            elif per_layer:  # the mean over the per-layer lines: dark and thicker
                ax.plot(steps, values, label=_CURVE_LABELS.get(key, key), color="black", linewidth=2, marker=marker)
            else:
                ax.plot(steps, values, label=_CURVE_LABELS.get(key, key.removeprefix("loss/")), marker=marker)
        ax.set(title=title, ylabel=ylabel, yscale=scale)
        ax.grid(True, which="major", alpha=0.3)
        if any(line.get_label() and not line.get_label().startswith("_") for line in ax.get_lines()):
            ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("training step")
    fig.tight_layout()
    return fig


def plot_training_curves(metrics_jsonl: Path, path: Path) -> Path:
    """Training curves from a run's metrics.jsonl, one quantity per panel on a shared step axis: the loss terms
    (log scale), held-out NMSE (mean and per layer, log scale) and L0 (held-out and training batches)."""
    plt = _pyplot()
    fig = training_curves_figure(metrics_jsonl)
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
