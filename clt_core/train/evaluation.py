"""Training's held-out evaluation: the store's held-out rows, read as training reads its batches."""

from __future__ import annotations

from typing import Any

import torch

from clt_core.data.sampler import Normalizer, SamplerConfig, held_out_batches, held_out_range, make_normalizer
from clt_core.data.store import ActivationStore
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.metrics import reconstruction_metrics
from clt_core.train.memory import EVAL_BATCH


@torch.no_grad()
def evaluate_holdout(
    model: CrossLayerTranscoder,
    store: ActivationStore,
    sampler: SamplerConfig,
    max_rows: int,
    device: str = "cpu",
    *,
    rows: tuple[int, int] | None = None,
    normalizer: Normalizer | None = None,
    batch_size: int = EVAL_BATCH,
) -> dict[str, Any]:
    """Per-layer metrics over up to `max_rows` held-out rows (every rank reads the same rows): `rows` of `store`
    (default: its held-out tail under the sampler settings), normalised with `normalizer` (default: the store's norm
    stats, which a model trained on the store was trained behind), `batch_size` rows a forward pass: the dense
    forward holds several float32 `[B, L, F]` tensors (~8 GB at B=4096 for SmolLM2 at F=2048), and `clt evaluate`
    reads 1,024 rows a batch too, so both report the same figures."""
    start, stop = rows if rows is not None else held_out_range(store, sampler.holdout_fraction)
    if normalizer is None:
        normalizer = make_normalizer(store, sampler.normalization_method)
    batches = held_out_batches(
        store, normalizer, rows=(start, min(stop, start + max_rows)), sampler=sampler, batch_size=batch_size
    )
    return reconstruction_metrics(model, ((b.inputs, b.targets) for b in batches), device)
