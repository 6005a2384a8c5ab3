"""Synthetic activation stores with a planted cross-layer dictionary, for demos, tests and benchmarks.

Each token activates a few of `num_features` features per layer; inputs at layer l are that layer's features times
an encoder dictionary plus noise, and targets at layer l sum the decoder contributions of features from layers ≤ l,
so a CLT has a real structure to recover.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from clt_core.config import Config
from clt_core.data.codecs import DEFAULT_CODEC, Codec
from clt_core.data.layout import DType
from clt_core.data.store import ActivationStore


class SyntheticConfig(Config):
    """Shape and content of a synthetic store."""

    rows: int = Field(8192, ge=1)
    """Token rows to write."""
    num_layers: int = Field(4, ge=1)
    """Layers L."""
    d_model: int = Field(64, ge=1)
    """Model width d."""
    num_features: int = Field(256, ge=1)
    """Planted features per layer."""
    active_per_token: int = Field(8, ge=1)
    """Features active per token and layer."""
    noise: float = Field(0.05, ge=0)
    """Standard deviation of the Gaussian noise added to inputs and targets."""
    dtype: DType = "bfloat16"
    """Storage dtype."""
    rows_per_chunk: int | None = Field(None, ge=1)
    """Rows per chunk (default: about 4 MiB per chunk)."""
    codec: Codec = DEFAULT_CODEC
    """Compression codec: zstd (level 1), none, blosc-lz4 or blosc-zstd (bit-shuffled)."""
    seed: int = 0
    """Seed for the dictionary and the data."""


def make_synthetic_store(url: str, config: SyntheticConfig, overwrite: bool = False) -> ActivationStore:
    """Write a store of `config.rows` rows; token ids are the row index modulo 50,000."""
    c = config
    gen = torch.Generator().manual_seed(c.seed)
    L, d, F = c.num_layers, c.d_model, c.num_features
    enc = torch.randn(L, F, d, generator=gen) / math.sqrt(d)
    dec = [torch.randn(L - s, F, d, generator=gen) / math.sqrt(d * (L - s)) for s in range(L)]
    store = ActivationStore.create(
        url,
        num_layers=L,
        d_model=d,
        dtype=c.dtype,
        rows_per_chunk=c.rows_per_chunk,
        compression=c.codec,
        overwrite=overwrite,
        model={"name": "synthetic", "num_features": F},
        text_dataset="synthetic",
        seed=c.seed,
    )
    block = max(1, min(c.rows, 4096))
    with store.writer() as writer:
        for start in range(0, c.rows, block):
            n = min(block, c.rows - start)
            feats = torch.zeros(n, L, F)
            idx = torch.rand(n, L, F, generator=gen).argsort(dim=-1)[..., : min(c.active_per_token, F)]
            feats.scatter_(-1, idx, torch.rand(n, L, idx.shape[-1], generator=gen) * 2 + 0.5)
            inputs = torch.einsum("nlf,lfd->nld", feats, enc)
            targets = torch.zeros(n, L, d)
            for s in range(L):
                targets[:, s:] += torch.einsum("nf,tfd->ntd", feats[:, s], dec[s])
            inputs += c.noise * torch.randn(inputs.shape, generator=gen)
            targets += c.noise * torch.randn(targets.shape, generator=gen)
            ids = torch.arange(start, start + n) % 50_000
            writer.append(inputs, targets, ids)
    return store
