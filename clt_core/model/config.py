"""The CLT's architecture: what a checkpoint's `config.json` holds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clt_core.config import Config
from clt_core.errors import ConfigError

Activation = Literal["jumprelu", "relu", "batchtopk", "topk"]
Decoders = Literal["cross_layer", "per_layer"]


class CLTConfig(Config):
    """A cross-layer transcoder: one encoder per layer, one decoder per (source layer, later target layer); or, with
    `decoders: per_layer`, its per-layer-transcoder baseline (one decoder per layer, to that layer alone)."""

    num_layers: int | None = Field(None, ge=1)
    """Layers of the underlying model (training takes it from the store when unset)."""
    d_model: int | None = Field(None, ge=1)
    """Width of the MLP inputs and outputs (training takes it from the store when unset)."""
    num_features: int = Field(ge=1)
    """Features per layer (F)."""
    decoders: Decoders = "cross_layer"
    """`cross_layer`: layer s's features decode to every layer s..L-1 (a CLT, decoders `W_dec.{s} [F, L-s, d]`);
    `per_layer`: to layer s alone (`W_dec.{s} [F, 1, d]`): a per-layer transcoder (PLT, one skipless transcoder per
    layer), the baseline a CLT is measured against, trained by the same code (encoder, activations, k, losses,
    sparse path). Model directories written before this setting existed are `cross_layer`."""
    activation_fn: Activation = "batchtopk"
    """`jumprelu` (learned threshold per feature), `relu`, `batchtopk` (top k·B per batch) or `topk` (per token)."""
    k: float = Field(32, gt=0)
    """batchtopk/topk: active features per token (per layer, or over all layers with `topk_scope: global`)."""
    topk_scope: Literal["per_layer", "global"] = "per_layer"
    """Count k per layer, or over all layers together."""
    jumprelu_threshold: float = Field(0.03, gt=0)
    """jumprelu: initial threshold of every feature (the parameter is its log)."""
    jumprelu_bandwidth: float = Field(0.1, gt=0)
    """jumprelu: width of the rectangle kernel of the straight-through estimator, in activation units."""
    sparse_decode_density: float = Field(0.05, ge=0, le=1)
    """Decode sparsely (gather active decoder rows) below this fraction of active features; densely above it."""
    seed: int = 0
    """Seed of the initial weights (the same whatever the number of feature shards)."""

    @model_validator(mode="after")
    def _check(self) -> CLTConfig:
        # ValueError, not ConfigError: pydantic then reports it together with every other problem of the file.
        if self.activation_fn not in ("batchtopk", "topk"):
            return self
        if self.topk_scope == "per_layer" and self.k > self.num_features:
            raise ValueError(
                f"k={self.k:g} is more than the {self.num_features} features of a layer; lower k or raise num_features"
            )
        if self.num_layers is not None and self.k > self.num_features * self.num_layers:
            limit = self.num_features * self.num_layers
            raise ValueError(
                f"k={self.k:g} is more than the {limit} features of all layers together; lower k or raise num_features"
            )
        return self

    def targets(self, source: int) -> range:
        """The layers that the features of layer `source` decode to: `source..L-1`, or `source` alone."""
        num_layers, _ = self.sizes()
        return range(source, num_layers if self.decoders == "cross_layer" else source + 1)

    def sizes(self) -> tuple[int, int]:
        """`(num_layers, d_model)`, which every built or saved model has (training takes them from the store)."""
        if self.num_layers is None or self.d_model is None:
            raise ConfigError("the model needs num_layers and d_model (training takes them from the store)")
        return self.num_layers, self.d_model
