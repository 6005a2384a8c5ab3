"""Small model directories for export and registry tests: random weights and a random normalisation."""

from __future__ import annotations

from pathlib import Path

import torch

from clt_core.data.sampler import Normalizer
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import load, save

L, D, F = 3, 16, 32
SOURCE = {
    "data": "/store",
    "store": {"model": {"name": "tiny-llama"}, "hook_templates": {"input_template": "m.{layer}"}},
}


def make_model_dir(
    path: Path, activation: str = "jumprelu", normalise: bool = True, decoders: str = "cross_layer"
) -> tuple[Path, Normalizer | None]:
    torch.manual_seed(0)
    config = CLTConfig(num_layers=L, d_model=D, num_features=F, activation_fn=activation, k=4, decoders=decoders)
    model = CrossLayerTranscoder(config)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
        if model.log_threshold is not None:
            model.log_threshold.copy_(torch.rand(L, F).mul(0.2).add(0.01).log())
    norm = Normalizer(torch.randn(L, D) * 3, torch.rand(L, D) * 4 + 0.1, torch.randn(L, D), torch.rand(L, D) + 0.5)
    norm = norm if normalise else None
    save(path, model, norm, SOURCE)
    return path, norm


def raw_reconstruction(model_dir: Path, norm: Normalizer | None, x: torch.Tensor) -> torch.Tensor:
    model = load(model_dir).model
    y = model(norm.inputs(x) if norm else x).reconstruction
    return norm.raw_targets(y) if norm else y
