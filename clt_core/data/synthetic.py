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
from clt_core.data.layout import DType, StorageDType, split_storage_dtype
from clt_core.data.quantize import REFERENCE_ROWS, reference_from_rows
from clt_core.data.store import ActivationStore
from clt_core.errors import ConfigError


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
    """Storage dtype (see also `storage_dtype`)."""
    storage_dtype: StorageDType | None = None
    """Storage dtype, quantised ones too (int8, fp8: bfloat16 values, one byte each); overrides `dtype`."""
    rows_per_chunk: int | None = Field(None, ge=1)
    """Rows per chunk (default: about 4 MiB per chunk)."""
    codec: Codec = DEFAULT_CODEC
    """Compression codec: zstd (level 1), none, blosc-lz4 or blosc-zstd (bit-shuffled)."""
    seed: int = 0
    """Seed for the dictionary and the data."""


def make_synthetic_store(url: str, config: SyntheticConfig, overwrite: bool = False) -> ActivationStore:
    """Write a store of `config.rows` rows; token ids are the row index modulo 50,000."""
    c = config
    if c.storage_dtype is not None and c.storage_dtype != c.dtype and c.dtype != "bfloat16":
        raise ConfigError(f"dtype {c.dtype} and storage_dtype {c.storage_dtype} contradict each other; give one")
    dtype, quantization = split_storage_dtype(c.storage_dtype or c.dtype)
    gen = torch.Generator().manual_seed(c.seed)
    L, d, F = c.num_layers, c.d_model, c.num_features
    enc = torch.randn(L, F, d, generator=gen) / math.sqrt(d)
    dec = [torch.randn(L - s, F, d, generator=gen) / math.sqrt(d * (L - s)) for s in range(L)]

    def rows(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = torch.zeros(n, L, F)
        idx = torch.rand(n, L, F, generator=gen).argsort(dim=-1)[..., : min(c.active_per_token, F)]
        feats.scatter_(-1, idx, torch.rand(n, L, idx.shape[-1], generator=gen) * 2 + 0.5)
        inputs = torch.einsum("nlf,lfd->nld", feats, enc)
        targets = torch.zeros(n, L, d)
        for s in range(L):
            targets[:, s:] += torch.einsum("nf,tfd->ntd", feats[:, s], dec[s])
        inputs += c.noise * torch.randn(inputs.shape, generator=gen)
        targets += c.noise * torch.randn(targets.shape, generator=gen)
        return inputs, targets, torch.arange(start, start + n) % 50_000

    block = max(1, min(c.rows, 4096))
    first = rows(0, block)
    reference = None
    if quantization != "none":  # from the first rows, as extraction computes it
        head = [t[:REFERENCE_ROWS].to(torch.bfloat16) for t in first[:2]]
        reference = reference_from_rows(*head)
    store = ActivationStore.create(
        url,
        num_layers=L,
        d_model=d,
        dtype=dtype,
        quantization=quantization,
        reference=reference,
        rows_per_chunk=c.rows_per_chunk,
        compression=c.codec,
        overwrite=overwrite,
        model={"name": "synthetic", "num_features": F},
        text_dataset="synthetic",
        seed=c.seed,
    )
    with store.writer() as writer:
        writer.append(*first)
        for start in range(block, c.rows, block):
            writer.append(*rows(start, min(block, c.rows - start)))
    return store
