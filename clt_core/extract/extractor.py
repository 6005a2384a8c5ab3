"""Extraction: run a causal LM over packed text through nnsight and write every layer's MLP input and output.

One forward per batch of context windows, stopped right after the last captured module (the LM head never runs);
the rows at kept positions go to a background writer, so writing overlaps the next forward. The store's metadata
records what produced it; a restarted extraction with the same settings continues at `rows_committed` and ends with
the same store (rows, token ids and norm stats) as an uninterrupted run. With `shard=Shard(i, n)`, n processes fill
disjoint row ranges of one store (see `clt_core.data.shards`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm import tqdm

from clt_core.config import Config
from clt_core.data.codecs import DEFAULT_CODEC, Codec
from clt_core.data.layout import StorageDType, split_storage_dtype
from clt_core.data.lease import StoreLease
from clt_core.data.norm_stats import NormStatsAccumulator
from clt_core.data.quantize import REFERENCE_ROWS, QuantReference, ensure_reference, reference_from_rows
from clt_core.data.shards import (
    Shard,
    ShardProgress,
    finish,
    read_progress,
    record_done,
    record_progress,
)
from clt_core.data.store import ActivationStore
from clt_core.devices import resolve_device
from clt_core.errors import ConfigError, StoreError
from clt_core.extract.writer import BackgroundWriter
from clt_core.lm.capture import CapturePoints, NNsightCapture, capture_points
from clt_core.lm.corpora import TextConfig, source_name
from clt_core.lm.loading import LoadedModel, resolve_model
from clt_core.lm.windows import batched_windows, corpus_rows, iter_windows, rows_between

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Aliases whose tokenizer reports a BOS the model was not trained to start documents with.
DEFAULT_BOS = {"smollm2-135m": "<|endoftext|>"}


class LanguageModelConfig(Config):
    """A language model, the text it reads and how the text is packed: what extraction and the live source share."""

    model: str = "smollm2-135m"
    """A local model directory, a GGUF file, a Hugging Face hub id, or the alias `smollm2-135m`."""
    text: TextConfig = TextConfig()
    """The corpus and how it is packed (see TextConfig); `--text SOURCE` sets `text.source`."""
    context_size: int = Field(128, ge=2)
    """Tokens per window, including the BOS."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype the model runs in."""
    input_template: str | None = None
    """Module path of the MLP input with `{layer}` (default: the architecture's preset)."""
    output_template: str | None = None
    """Module path of the MLP output with `{layer}` (default: the architecture's preset)."""


class ExtractConfig(LanguageModelConfig):
    """What to extract, from which model and text, and how."""

    tokens: int = Field(100_000, ge=1)
    """Token rows to write, exactly (BOS and special-token positions are not rows)."""
    batch_size: int = Field(8, ge=1)
    """Windows per forward pass."""
    storage_dtype: StorageDType = "bfloat16"
    """Dtype of the stored activations: bfloat16, float16, float32, or quantised to one byte a value, int8 or fp8
    (e4m3fn) with a scale per row and layer, read back as bfloat16 (docs/formats.md)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""
    chunk_rows: int | None = Field(None, ge=1)
    """Rows per store chunk (default: about 4 MiB per chunk)."""
    codec: Codec = DEFAULT_CODEC
    """Compression codec of the store's arrays: zstd (level 1), none, blosc-lz4 or blosc-zstd (bit-shuffled)."""


@dataclass
class ExtractSummary:
    url: str
    rows: int
    """Rows the store holds (committed) at the end of this run."""
    rows_this_run: int
    seconds: float
    resumed_from: int
    """Rows of this run's range already written before it started."""
    shard: Shard = field(default_factory=Shard)
    shards_done: int = 1
    loop_seconds: float = 0.0
    """Time spent in the forward-and-write loop (without loading the model and counting the corpus)."""

    def __str__(self) -> str:
        rate = self.rows_this_run / self.loop_seconds if self.loop_seconds else 0.0
        resumed = f", resumed after {self.resumed_from:,} rows" if self.resumed_from else ""
        line = f"extracted {self.rows_this_run:,} rows in {self.seconds:.1f} s ({rate:,.0f} tokens/s){resumed}; "
        if self.shards_done < self.shard.count:
            return line + (
                f"shard {self.shard.index}/{self.shard.count} done, {self.shards_done} of {self.shard.count} shards "
                f"finished; the store is committed when the last one finishes"
            )
        return line + f"{self.url} holds {self.rows:,} rows with norm stats"


def lm_provenance(loaded: LoadedModel, points: CapturePoints, context_size: int, text: TextConfig) -> dict[str, Any]:
    """What a store records about the language model and text its rows come from (extracted or live)."""
    return {
        "model": {
            "name": loaded.name,
            "architecture": loaded.architecture,
            "weights_hash": loaded.weights_hash,
            "revision": loaded.revision,
        },
        "context_size": context_size,
        "hook_templates": points.as_dict(),
        "text_dataset": source_name(text),
    }


def _provenance(config: ExtractConfig, loaded: LoadedModel, points: CapturePoints, shards: int) -> dict[str, Any]:
    """What the store records about its origin; a resumed run must match it."""
    return {
        **lm_provenance(loaded, points, config.context_size, config.text),
        "extraction": {
            "tokens": config.tokens,
            "text": config.text.model_dump(mode="json"),
            "compute_dtype": config.compute_dtype,
            "shards": shards,
        },
    }


def _open_or_create(
    url: str, config: ExtractConfig, loaded: LoadedModel, provenance: dict[str, Any], overwrite: bool, sharded: bool
) -> ActivationStore:
    """The store to write: a new one, or (same settings only) the one a previous or sibling run began. Creating
    with `exist_ok` also completes a store whose creation was killed, and lets shards that start together all
    create it."""
    dtype, quantization = split_storage_dtype(config.storage_dtype)
    store = ActivationStore.create(
        url,
        num_layers=loaded.num_layers,
        d_model=loaded.d_model,
        dtype=dtype,
        quantization=quantization,
        rows_per_chunk=config.chunk_rows,
        compression=config.codec,
        overwrite=overwrite,
        exist_ok=not overwrite,
        reserve_rows=config.tokens if sharded else 0,
        **provenance,
    )
    store.require(num_layers=loaded.num_layers, d_model=loaded.d_model)
    if store.storage_dtype != config.storage_dtype:
        raise StoreError(
            f"{store.url} was extracted with storage dtype {store.storage_dtype}, now {config.storage_dtype}; resume "
            "with the same storage dtype, or pass --overwrite to start over"
        )
    if store.codec != config.codec:
        raise StoreError(
            f"{store.url} was extracted with codec {store.codec}, now {config.codec}; resume with the same codec, or "
            "pass --overwrite to start over"
        )
    recorded = store.info.model_dump(mode="json")
    for key, value in provenance.items():
        if recorded.get(key) != value:
            raise StoreError(
                f"{store.url} was extracted with other settings ({key}: {recorded.get(key)!r}, now {value!r}); "
                "resume with the same settings, or pass --overwrite to start over"
            )
    return store


def extract(
    url: str, config: ExtractConfig, *, shard: Shard | None = None, overwrite: bool = False, progress: bool = True
) -> ExtractSummary:
    """Extract `config.tokens` rows into the store at `url` (or shard `shard`'s range of them), resuming a partial
    run. A sharded store is committed, with its norm stats, by whichever shard finishes last."""
    start_time = time.perf_counter()
    shard = shard or Shard()
    sharded = shard.count > 1
    if sharded and overwrite:
        raise ConfigError("--overwrite with --shard would delete the other shards' rows; delete the store first")
    # the lease first, so that a second run into a store being written is refused before it loads a model
    what = f"extract {shard.index}/{shard.count}" if sharded else "extract"
    with StoreLease(url, f"extract-{shard.name}" if sharded else "extract", what=what) as lease:
        return _extract_leased(url, config, shard, overwrite, progress, lease, start_time)


def _extract_leased(
    url: str, config: ExtractConfig, shard: Shard, overwrite: bool, progress: bool, lease: StoreLease, start_time: float
) -> ExtractSummary:
    """`extract`, once it holds the store's lease: load the model, check the corpus, write the rows."""
    sharded = shard.count > 1
    device = resolve_device(config.device)
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    loaded = resolve_model(config.model, dtype=dtype, device=device, progress=progress)
    if loaded.max_context is not None and config.context_size > loaded.max_context:
        raise ConfigError(
            f"context_size {config.context_size} is larger than {loaded.name}'s maximum of {loaded.max_context}; "
            f"lower --context-size"
        )
    points = capture_points(loaded.model, config.input_template, config.output_template)
    text = config.text
    if text.bos_token is None and text.add_bos and config.model.lower() in DEFAULT_BOS:
        text = text.model_copy(update={"bos_token": DEFAULT_BOS[config.model.lower()]})
    provenance = _provenance(config.model_copy(update={"text": text}), loaded, points, shard.count)

    available = corpus_rows(text, loaded.tokenizer, config.context_size, limit=config.tokens)
    if available.rows < config.tokens:
        raise ConfigError(
            f"--tokens {config.tokens:,} is more than the corpus {text.source!r} holds at context size "
            f"{config.context_size}: {available.rows:,} rows; lower --tokens or add text"
        )
    store = _open_or_create(url, config, loaded, provenance, overwrite, sharded)
    if store.quantized:  # before any row: the same one for every shard, and for a resumed run the stored one
        ensure_reference(store, lambda: _first_rows_reference(config, loaded, text, points, device))
    return _extract_rows(store, config, loaded, text, points, shard, lease, start_time, device, progress)


def _first_rows_reference(
    config: ExtractConfig, loaded: LoadedModel, text: TextConfig, points: CapturePoints, device: str
) -> QuantReference:
    """The quantisation reference of the store's first rows (`REFERENCE_ROWS`, or all when fewer), whichever shard
    computes it: their forward pass, rounded to bfloat16."""
    want = min(config.tokens, REFERENCE_ROWS)
    windows = rows_between(iter_windows(text, loaded.tokenizer, config.context_size), 0, want)
    capture = NNsightCapture(loaded.model, points)
    inputs, targets = [], []
    for batch in batched_windows(windows, config.batch_size):
        ids = torch.from_numpy(np.stack([w.token_ids for w in batch])).to(device)
        keep = torch.from_numpy(np.stack([w.keep for w in batch])).to(device)
        x, y = capture(ids)
        inputs.append(x[keep].to("cpu", torch.bfloat16))
        targets.append(y[keep].to("cpu", torch.bfloat16))
    return reference_from_rows(torch.cat(inputs)[:want], torch.cat(targets)[:want])


def _extract_rows(
    store: ActivationStore,
    config: ExtractConfig,
    loaded: LoadedModel,
    text: TextConfig,
    points: CapturePoints,
    shard: Shard,
    lease: StoreLease,
    start_time: float,
    device: str,
    progress: bool,
) -> ExtractSummary:
    """Write this run's rows (all of them, or the shard's range), from where an earlier run stopped."""
    sharded = shard.count > 1
    rows = store.rows_per_chunk
    if sharded:
        start, stop = shard.rows(config.tokens, rows)
        record = read_progress(store, shard) or ShardProgress(start, stop)
        done = start + record.rows_done
        if record.done:
            return _finish_shard(store, config, shard, 0, time.perf_counter() - start_time, record.rows_done)

        def commit(row: int) -> None:
            record_progress(store, shard, ShardProgress(start, stop, row - start))

        writer = store.writer(start=done, commit=commit)
    else:
        start, stop = 0, config.tokens
        done = store.num_rows
        if done >= stop:
            return ExtractSummary(store.url, done, 0, time.perf_counter() - start_time, done)
        writer = store.writer()
    stats = NormStatsAccumulator(store.num_layers, store.d_model)
    for chunk in store.iter_chunks(start // rows, done // rows, limit=done):  # refold committed chunks, in order
        stats.update(chunk.inputs, chunk.targets)

    windows = rows_between(iter_windows(text, loaded.tokenizer, config.context_size), done, stop)
    capture = NNsightCapture(loaded.model, points)
    background = BackgroundWriter(writer, stats)
    desc = f"extract {shard.index}/{shard.count}" if sharded else "extract"
    bar = tqdm(total=stop - start, initial=done - start, unit="tok", unit_scale=True, desc=desc, disable=not progress)
    row_mb = store.row_bytes / 1e6
    written = 0
    loop_start = time.perf_counter()
    try:
        for batch in batched_windows(windows, config.batch_size):
            lease.check()
            ids = torch.from_numpy(np.stack([w.token_ids for w in batch])).to(device)
            keep = torch.from_numpy(np.stack([w.keep for w in batch])).to(device)
            inputs, targets = capture(ids)
            background.put(inputs[keep].cpu(), targets[keep].cpu(), ids[keep].cpu())
            n = int(keep.sum())
            written += n
            bar.update(n)
            bar.set_postfix_str(f"{written * row_mb:,.0f} MB written")
        background.close()
    except BaseException:
        background.abort()
        raise
    finally:
        bar.close()
    loop_seconds = time.perf_counter() - loop_start
    if sharded:
        record_done(store, shard, ShardProgress(start, stop), stats)
        summary = _finish_shard(store, config, shard, written, time.perf_counter() - start_time, done - start)
    else:
        store.write_norm_stats(stats.result())
        summary = ExtractSummary(store.url, store.num_rows, written, time.perf_counter() - start_time, done)
    summary.loop_seconds = loop_seconds
    return summary


def _finish_shard(
    store: ActivationStore, config: ExtractConfig, shard: Shard, written: int, seconds: float, resumed_from: int
) -> ExtractSummary:
    """Commit the store if this was the last shard to finish; say how far the shards are."""
    finished, stats = finish(store.url, shard.count, config.tokens)
    rows = config.tokens if stats is not None else 0
    return ExtractSummary(store.url, rows, written, seconds, resumed_from, shard, finished)
