"""`clt convert`: a batchtopk/topk checkpoint becomes a JumpReLU model directory.

Data: the store's held-out rows (the split of the model's training sampler, from its `source.json`), normalised with
the model's own normalisation. The first `fit_rows` of them are the fitting sample (threshold estimation over
`batches` batches, then L0 calibration); the metrics are reported on the held-out rows after them, which neither
step saw. Before, after estimation and after calibration: NMSE, explained variance and L0 per layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm import tqdm

from clt_core.config import Config
from clt_core.convert.calibrate import l0_per_layer, layer_scales
from clt_core.convert.theta import ESTIMATORS, ThresholdStats
from clt_core.data.sampler import held_out_batches
from clt_core.data.store import ActivationStore
from clt_core.errors import ConfigError
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.directory import full_state, load, write_atomically, write_model
from clt_core.model.metrics import reconstruction_metrics

SUMMARY_FILE = "conversion.json"


class ConvertConfig(Config):
    """How a batchtopk/topk model is converted to JumpReLU."""

    batches: int = Field(16, ge=1)
    """Batches of the fitting sample to estimate thresholds over."""
    batch_size: int | None = Field(None, ge=1)
    """Tokens per batch; default: the training batch size (batchtopk selects per batch, so it matters)."""
    estimator: Literal["auto", "min_mean", "standardized"] = "auto"
    """Threshold estimator (see clt_core.convert.theta); `auto` tries both and keeps the lower held-out NMSE."""
    default_theta: float = Field(1e6, gt=0)
    """Threshold of features never selected during estimation (a large value keeps them silent)."""
    calibrate: bool = True
    """Scale each layer's thresholds so its L0 on the fitting sample matches the original model's."""
    tolerance: float = Field(0.5, gt=0)
    """Largest accepted |L0 − target| per layer after calibration, in features per token."""
    fit_rows: int | None = Field(None, ge=1)
    """Held-out rows used for fitting; default: batches × batch_size, at most half the held-out rows."""
    eval_rows: int = Field(8192, ge=1)
    """Held-out rows (after the fitting ones) the metrics are reported on."""
    holdout_fraction: float | None = Field(None, gt=0, lt=1)
    """Held-out share of the store's chunks; default: the model's training split (source.json)."""
    device: str = "cpu"


def jumprelu_model(model: CrossLayerTranscoder, theta: torch.Tensor) -> CrossLayerTranscoder:
    """The same weights with a JumpReLU at thresholds `theta [L, F]`."""
    config = model.config.model_copy(update={"activation_fn": "jumprelu"})
    out = CrossLayerTranscoder(config, model.shards)
    with torch.no_grad():
        for name, param in model.named_parameters():
            out.get_parameter(name).copy_(param)
        out.log_threshold.copy_(theta.log())
    return out.to(model.b_dec.device)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "feature_density"}


def convert(
    checkpoint: str | Path,
    out: str | Path,
    config: ConvertConfig | None = None,
    *,
    data: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert the batchtopk/topk model in `checkpoint` to a JumpReLU model directory `out`; returns the report
    (also written to `out/conversion.json`)."""
    config = config or ConvertConfig()
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    model, normalizer, source, _ = trained = load(checkpoint, device=config.device)
    if model.config.activation_fn not in ("batchtopk", "topk"):
        raise ConfigError(f"{checkpoint} is a {model.config.activation_fn} model; only batchtopk/topk models convert")
    data = data or source.get("data")
    if data is None:
        raise ConfigError(f"{checkpoint} does not say which store it was trained on; pass --data URL")
    store = ActivationStore.open(data)
    store.require(num_layers=model.config.num_layers, d_model=model.config.d_model)
    sampler = source.get("sampler", {})
    batch_size = config.batch_size or sampler.get("batch_size") or 1024
    start, stop, _ = trained.held_out_rows(store, config.holdout_fraction)
    held = stop - start
    fit_rows = config.fit_rows or min(config.batches * batch_size, held // 2)
    if fit_rows < 1 or fit_rows >= held:
        raise ConfigError(
            f"{store.url}: {held:,} held-out rows cannot hold {fit_rows:,} fitting rows and any evaluation rows; "
            "lower --fit-rows or --batch-size, or raise the holdout fraction"
        )
    fit_stop, eval_stop = start + fit_rows, min(stop, start + fit_rows + config.eval_rows)
    device = config.device

    def batches(rows: tuple[int, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # rows read as training read them: its dtype, its NaN/Inf policy
        for b in held_out_batches(store, normalizer, rows=rows, sampler=trained.sampler, batch_size=batch_size):
            yield b.inputs.to(device, torch.float32), b.targets.to(device, torch.float32)

    def fit_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches((start, fit_stop))

    def evaluate(m: CrossLayerTranscoder) -> dict[str, Any]:
        return reconstruction_metrics(m, batches((fit_stop, eval_stop)), device)

    bar = tqdm(total=4, desc="convert", unit="stage", disable=not progress)
    before = evaluate(model)
    bar.update()
    # One pass over the fitting sample: the estimators' statistics, the pre-activations for calibration and the
    # original model's L0 per layer (with its own batch-wise selection).
    stats = ThresholdStats(model.num_layers, model.num_local_features)
    pres, active = [], torch.zeros(model.num_layers, dtype=torch.float64)
    with torch.no_grad():
        for i, (x, _) in enumerate(fit_batches()):
            pre = model.encode(x)
            acts = model.activate(pre)
            if i < config.batches:
                stats.update(pre, acts != 0)
            active += (acts != 0).sum(dim=(0, 2)).double().cpu()
            pres.append(pre.cpu())
    pre = torch.cat(pres)
    target_l0 = active / pre.shape[0]
    bar.update()

    candidates = ESTIMATORS if config.estimator == "auto" else (config.estimator,)
    results: dict[str, dict[str, Any]] = {}
    for name in candidates:
        theta = stats.thresholds(name, config.default_theta)
        result: dict[str, Any] = {"estimated": _summary(evaluate(jumprelu_model(model, theta)))}
        result["estimated"]["fit_l0"] = l0_per_layer(pre, theta).tolist()
        if config.calibrate:
            scales = layer_scales(pre, theta, target_l0).float()
            theta = theta * scales[:, None]
            result["scales"] = scales.tolist()
        converted = jumprelu_model(model, theta)
        result["calibrated" if config.calibrate else "final"] = _summary(evaluate(converted))
        result["fit_l0"] = l0_per_layer(pre, converted.threshold.detach().cpu()).tolist()
        result["model"], result["theta"] = converted, theta
        results[name] = result
    bar.update()
    stage = "calibrated" if config.calibrate else "final"
    chosen = min(results, key=lambda n: results[n][stage]["mean_nmse"])
    best = results[chosen]
    misses = [abs(a - b) for a, b in zip(best["fit_l0"], target_l0.tolist(), strict=True)]
    if config.calibrate and max(misses) > config.tolerance:
        layer = max(range(len(misses)), key=misses.__getitem__)
        raise ConfigError(
            f"L0 calibration missed layer {layer} by {misses[layer]:.2f} features per token (tolerance "
            f"{config.tolerance}); ties in the pre-activations? Use more --fit-rows"
        )
    report = {
        "checkpoint": str(checkpoint),
        "data": store.url,
        "estimator": chosen,
        "config": config.model_dump(mode="json"),
        "fit_rows": fit_rows,
        "eval_rows": eval_stop - fit_stop,
        "batch_size": batch_size,
        "target_l0": target_l0.tolist(),
        "before": _summary(before),
        "estimators": {n: {k: v for k, v in r.items() if k not in ("model", "theta")} for n, r in results.items()},
        **{k: v for k, v in best.items() if k not in ("model", "theta")},
    }
    report["max_l0_miss"] = max(misses)
    converted = best["model"]
    converted_source = {**source, "data": store.url, "converted_from": str(checkpoint)}

    def fill(tmp: Path) -> None:
        write_model(tmp, converted.config, full_state(converted), normalizer, converted_source)
        (tmp / SUMMARY_FILE).write_text(json.dumps(report, indent=2))

    write_atomically(out, fill)
    bar.update()
    bar.close()
    return report


def describe(report: dict[str, Any]) -> str:
    """A few lines for the console: NMSE and L0 before, after estimation and after calibration."""
    best = report["estimators"][report["estimator"]]
    rows = [("original", report["before"]), ("estimated", best["estimated"])]
    if "calibrated" in best:
        rows.append(("calibrated", best["calibrated"]))
    lines = [f"estimator {report['estimator']} ({report['fit_rows']:,} fitting rows, {report['eval_rows']:,} held-out)"]
    for name, m in rows:
        ev = sum(m["explained_variance"]) / len(m["explained_variance"])
        lines.append(f"  {name:<10} NMSE {m['mean_nmse']:.4f}  EV {ev:.4f}  L0 {m['total_l0']:.2f}")
    target = sum(report["target_l0"])
    lines.append(f"  target L0 on the fitting rows {target:.2f}; largest per-layer miss {report['max_l0_miss']:.3f}")
    return "\n".join(lines)
