"""Reconstruction metrics of a model directory on a store's held-out rows: NMSE, explained variance and L0 per layer,
dead features (never fired on the rows read) and dense ones (firing on more than `dense_threshold` of them).

The rows are the store's held-out tail with the split the model was trained with (`source.json`, else the run's
`train_config.yaml`), minus any rows a conversion fitted its thresholds on (`conversion.json`), normalised with the
model's *own* normalisation, so a store of the same language model other than the training one is evaluated the same
way the model sees its inputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from clt_core.data.sampler import held_out_batches
from clt_core.data.store import ActivationStore
from clt_core.errors import ConfigError
from clt_core.model.directory import TrainedModel, load
from clt_core.model.metrics import reconstruction_metrics

log = logging.getLogger(__name__)


def evaluate_model(
    model: str | Path | TrainedModel,
    data_url: str | None = None,
    *,
    max_rows: int = 8192,
    batch_size: int = 1024,
    holdout_fraction: float | None = None,
    dense_threshold: float = 0.1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Held-out metrics of the CLT in a model directory (or one already loaded: then on its device) on `data_url`
    (default: its training store).

    `holdout_fraction` overrides the training split (needed when the store is not the training one and the split is
    unknown). Returns JSON-ready per-layer lists and totals (and the model's `decoders`: cross_layer, or per_layer for
    the per-layer-transcoder baseline) plus `feature_density`, a `[L, F]` tensor (fraction of the rows each feature
    fired on) for the density plot.
    """
    trained = model if isinstance(model, TrainedModel) else load(model, device=device)
    clt, normalizer, model_dir = trained.model, trained.normalizer, trained.path
    device = str(clt.W_enc.device)
    url = data_url or trained.data_url
    if url is None:
        raise ConfigError(f"{model_dir} does not say which store it was trained on; pass --data URL")
    store = ActivationStore.open(url)
    cfg = clt.config
    if (store.num_layers, store.d_model) != (cfg.num_layers, cfg.d_model):
        raise ConfigError(
            f"{store.url} has {store.num_layers} layers of width {store.d_model}, the model {model_dir} "
            f"{cfg.num_layers} of width {cfg.d_model}: evaluate it on a store of its own language model"
        )
    start, stop, fraction = trained.held_out_rows(store, holdout_fraction)
    conversion = model_dir / "conversion.json"
    if conversion.exists() and data_url is None:
        start += json.loads(conversion.read_text()).get("fit_rows", 0)  # rows the thresholds were fitted on
    stop = min(stop, start + max_rows)
    if stop <= start:
        raise ConfigError(f"{store.url}: no held-out rows left to evaluate on")
    # Rows are read as training read them (its dtype, its NaN/Inf policy) and normalised on the CPU;
    # reconstruction_metrics moves each batch to `device`.
    batches = held_out_batches(store, normalizer, rows=(start, stop), sampler=trained.sampler, batch_size=batch_size)
    metrics = reconstruction_metrics(clt, ((b.inputs, b.targets) for b in batches), device)
    density = metrics.pop("feature_density").cpu()
    dead, dense = density == 0, density > dense_threshold
    metrics.update(
        {
            "dead_per_layer": dead.double().mean(dim=1).tolist(),
            "dense_fraction": float(dense.double().mean()),
            "dense_per_layer": dense.double().mean(dim=1).tolist(),
            "dead_count": int(dead.sum()),
            "dense_count": int(dense.sum()),
            "dense_threshold": dense_threshold,
            "holdout_fraction": fraction,
            "held_out_rows": [start, stop],
            "data": store.url,
            "decoders": cfg.decoders,  # a per-layer baseline's report says so beside the CLT's
            "feature_density": density,
        }
    )
    return metrics
