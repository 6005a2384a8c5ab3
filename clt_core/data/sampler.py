"""Training batches from an activation store: shuffled across chunks, deterministic, resumable, prefetched.

The training rows of a store (all chunks but the held-out tail) form, for each rank, an endless *stream*:
epoch `e` orders the training chunks by a permutation seeded with `(seed, e)` and groups them into windows of
`buffer_chunks` chunks; rank `r` of `world_size` takes windows `r, r + world_size, ...`; each window's rows are
permuted (seeded with `(seed, e, window)`) and appended to the stream. Batch `b` is rows `[b·B, (b+1)·B)` of that
stream, so batches mix rows of many chunks, epochs roll over seamlessly, and the whole sampler state is one integer:
the stream position. Resuming re-derives everything else from the seed.

A background thread reads, shuffles, converts and normalises the next windows (at most `prefetch_windows` ahead,
none past `read_ahead_until`) while the caller trains on the current one. The held-out chunks are never in the
stream; `held_out_batches` reads them in order for evaluation.

Rows holding NaN or Inf are found as chunks are read: by default (`nonfinite: error`) they stop the sampler with the
store and the first bad rows named; with `nonfinite: skip` they are left out of their window. The state then also
records how many rows each chunk lost, so a resumed stream still finds its place without re-reading anything.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from clt_core.config import Config
from clt_core.data.layout import ActivationRows, RawRows
from clt_core.data.norm_stats import NormStats, finite_rows
from clt_core.data.store import ActivationStore
from clt_core.data.stream import BlockStream
from clt_core.errors import ConfigError, StoreError
from clt_core.model import kernels

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_VERSION = 1


class SamplerConfig(Config):
    """How batches are drawn from a store."""

    batch_size: int = Field(4096, ge=1)
    """Token rows per batch (per rank)."""
    buffer_chunks: int = Field(8, ge=1)
    """Chunks whose rows are shuffled together: larger mixes better and costs memory (`prefetch_windows` + 1
    windows resident)."""
    seed: int = 0
    """Seed of the chunk and row orders."""
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of chunks, taken from the end of the store, reserved for evaluation and never trained on."""
    normalization_method: Literal["auto", "mean_std", "none"] = "auto"
    """`mean_std`: standardise inputs and targets with the store's norm stats (error if absent); `auto`: do so when
    the store has norm stats; `none`: raw activations."""
    dtype: Literal["store", "float32", "bfloat16", "float16"] = "store"
    """Dtype of the batches: `store` keeps the store's dtype (normalised bf16 loses nothing the bf16 store kept,
    and moves half the bytes of float32); ask for float32 to get it converted here."""
    prefetch_windows: int = Field(2, ge=1)
    """Windows read ahead of the one being sampled by the background thread (each is `buffer_chunks` chunks)."""
    read_workers: int = Field(8, ge=1)
    """Chunks of a window read concurrently."""
    nonfinite: Literal["error", "skip"] = "error"
    """Rows holding NaN or Inf: `error` stops with the store and the first bad rows named (`clt verify` lists them
    all); `skip` leaves them out of the batches and of the held-out evaluation."""


def split_chunks(num_chunks: int, holdout_fraction: float) -> tuple[range, range]:
    """Training and held-out chunk ranges; the held-out tail is at least one chunk when the fraction is positive."""
    held = math.ceil(num_chunks * holdout_fraction) if holdout_fraction > 0 else 0
    if holdout_fraction > 0 and held >= num_chunks:
        raise StoreError(
            f"holdout_fraction={holdout_fraction} leaves no training chunk out of {num_chunks}; "
            "lower it or use a store with more chunks"
        )
    return range(0, num_chunks - held), range(num_chunks - held, num_chunks)


class Normalizer:
    """Standardises rows: `(x - mean) / std` per layer and dimension, computed as `x·scale + bias` in float32.
    `std` is already floored; the four `[L, d]` tensors are what a model directory's `normalization.safetensors`
    holds, so a trained model carries the exact affine map it was trained behind."""

    def __init__(
        self, inputs_mean: torch.Tensor, inputs_std: torch.Tensor, targets_mean: torch.Tensor, targets_std: torch.Tensor
    ) -> None:
        f32 = torch.float32
        self.inputs_mean, self.inputs_std = inputs_mean.to(f32), inputs_std.to(f32)
        self.targets_mean, self.targets_std = targets_mean.to(f32), targets_std.to(f32)
        self.inputs_scale = 1.0 / self.inputs_std
        self.inputs_bias = -self.inputs_mean * self.inputs_scale
        self.targets_scale = 1.0 / self.targets_std
        self.targets_bias = -self.targets_mean * self.targets_scale

    @classmethod
    def from_stats(cls, stats: NormStats, eps: float = 1e-6) -> Normalizer:
        """From a store's norm stats, std floored at `eps`."""

        def t(a: object) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float32)

        inputs_std, targets_std = t(stats.inputs_std).clamp_min(eps), t(stats.targets_std).clamp_min(eps)
        return cls(t(stats.inputs_mean), inputs_std, t(stats.targets_mean), targets_std)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "inputs_mean": self.inputs_mean,
            "inputs_std": self.inputs_std,
            "targets_mean": self.targets_mean,
            "targets_std": self.targets_std,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Normalizer:
        return cls(state["inputs_mean"], state["inputs_std"], state["targets_mean"], state["targets_std"])

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return _affine(x, self.inputs_scale, self.inputs_bias)

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return _affine(y, self.targets_scale, self.targets_bias)

    def raw_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Normalised targets (e.g. a reconstruction) back to raw activations."""
        return y.to(torch.float32) * self.targets_std + self.targets_mean


def _affine(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # Convert first, then in-place same-dtype passes: mixed-dtype elementwise ops take a slow path on CPU. A product,
    # then a sum, each rounded, as the compiled kernels compute it on every CPU (`addcmul` fuses them where the CPU
    # has FMA: its values then differ from the kernels' in about 1 of 30,000 bf16 results).
    y = x.to(torch.float32, copy=True)
    return y.mul_(scale).add_(bias)


def make_normalizer(store: ActivationStore, method: str) -> Normalizer | None:
    if method == "none":
        return None
    stats = store.read_norm_stats()
    if stats is None:
        if method == "mean_std":
            raise StoreError(
                f"{store.url}: normalization_method=mean_std but the store has no norm stats; run "
                f"`clt norm-stats {store.url}` first"
            )
        return None
    if not all(np.isfinite(getattr(stats, name)).all() for name in NormStats.ARRAYS):
        # Every row would be normalised to NaN: training would silently learn nothing.
        raise StoreError(
            f"{store.url}: its norm stats hold NaN/Inf (computed over rows holding NaN/Inf by an older version); "
            f"recompute them with `clt norm-stats {store.url}`, which leaves such rows out"
        )
    return Normalizer.from_stats(stats)


def nonfinite_rows(rows: ActivationRows) -> torch.Tensor:
    """Per row: whether its inputs or targets hold a NaN or an Inf (`[n]` bool)."""
    return ~finite_rows(rows.inputs, rows.targets)


def nonfinite_error(store: ActivationStore, bad: list[int], lo: int, hi: int) -> StoreError:
    """The error for rows `bad` (absolute indices, among rows [lo, hi)) holding NaN/Inf."""
    shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return StoreError(
        f"{store.url}: row(s) {shown} hold NaN/Inf (found reading rows {lo}..{hi - 1}); `clt verify {store.url}` "
        "lists every such row; set sampler.nonfinite: skip (--nonfinite skip) to train without them"
    )


def output_dtype(store: ActivationStore, config: SamplerConfig) -> torch.dtype:
    return store.torch_dtype if config.dtype == "store" else OUTPUT_DTYPES[config.dtype]


def _rows_to_skip(store: ActivationStore, rows: ActivationRows, lo: int, policy: str) -> torch.Tensor:
    """Which of rows [lo, lo + n) hold NaN/Inf (`[n]` bool) when `policy` is `skip`; an error naming them when it is
    `error`."""
    return _apply_policy(store, nonfinite_rows(rows), lo, policy)


def _apply_policy(store: ActivationStore, bad: torch.Tensor, lo: int, policy: str) -> torch.Tensor:
    """`bad` (rows [lo, lo + n) holding NaN/Inf) under `policy`: returned for `skip`, an error naming them for
    `error`."""
    if policy == "error" and bad.any():
        raise nonfinite_error(store, (bad.nonzero().flatten() + lo).tolist(), lo, lo + len(bad))
    return bad


def _finite_only(store: ActivationStore, rows: ActivationRows, lo: int, policy: str) -> ActivationRows:
    """Rows [lo, lo + n) without those holding NaN/Inf (`skip`), or an error naming them (`error`)."""
    bad = _rows_to_skip(store, rows, lo, policy)
    return ActivationRows(*(t[~bad] for t in rows)) if bad.any() else rows


def place_rows(
    rows: ActivationRows, normalizer: Normalizer | None, out: ActivationRows, positions: torch.Tensor, bad: torch.Tensor
) -> None:
    """`out[positions] = rows`, normalised with `normalizer` (None: as they are) and converted to `out`'s dtype;
    `bad[i] |=` whether row i holds NaN/Inf. bf16 rows into bf16 `out` take one compiled pass each for inputs and
    targets where the kernels are built (the same values as `_prepare`'s), PyTorch otherwise."""
    if rows.inputs.dtype == out.inputs.dtype == torch.bfloat16 and kernels.compiled_for(rows.inputs):
        norm = normalizer
        affine = (norm.inputs_scale, norm.inputs_bias, norm.targets_scale, norm.targets_bias) if norm else (None,) * 4
        kernels.prepare_rows(rows.inputs.contiguous(), affine[0], affine[1], out.inputs, positions, bad)
        kernels.prepare_rows(rows.targets.contiguous(), affine[2], affine[3], out.targets, positions, bad)
        out.token_ids.index_copy_(0, positions, rows.token_ids)
        return
    bad |= nonfinite_rows(rows)
    for dest, part in zip(out, _prepare(rows, normalizer, out.inputs.dtype), strict=True):
        dest.index_copy_(0, positions, part)


def _prepare(rows: ActivationRows, normalizer: Normalizer | None, dtype: torch.dtype) -> ActivationRows:
    inputs, targets = rows.inputs, rows.targets
    if normalizer is not None:
        inputs, targets = normalizer.inputs(inputs), normalizer.targets(targets)
    return ActivationRows(inputs.to(dtype), targets.to(dtype), rows.token_ids)


@dataclass(frozen=True)
class _Window:
    epoch: int
    index: int  # window index within the epoch
    chunks: tuple[int, ...]
    rows: int


class ActivationSampler(BlockStream):
    """Endless iterator of shuffled `ActivationRows` batches for one rank; see the module docstring."""

    def __init__(self, store: ActivationStore, config: SamplerConfig, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        super().__init__(config.batch_size, config.prefetch_windows)
        self.store = store
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.train_chunks, self.holdout_chunks = split_chunks(store.num_chunks, config.holdout_fraction)
        if len(self.train_chunks) == 0:
            raise StoreError(f"{store.url}: no committed rows to sample from")
        windows_per_epoch = math.ceil(len(self.train_chunks) / config.buffer_chunks)
        # More windows than this in a row without a single finite row means a whole epoch had none.
        self._max_empty_windows = 2 * math.ceil(windows_per_epoch / world_size) + 1
        if windows_per_epoch < world_size:
            raise StoreError(
                f"{store.url}: {len(self.train_chunks)} training chunks make {windows_per_epoch} windows of "
                f"buffer_chunks={config.buffer_chunks}, fewer than world_size={world_size}; lower buffer_chunks"
            )
        self.normalizer = make_normalizer(store, config.normalization_method)
        self.dtype = output_dtype(store, config)
        self._pool = ThreadPoolExecutor(config.read_workers, thread_name_prefix="clt-sampler-read")
        self._skipped: dict[int, int] = {}  # chunk -> rows left out for NaN/Inf (`nonfinite: skip`)
        self._skipped_lock = threading.Lock()

    # ------------------------------------------------------------ the stream
    def _epoch_windows(self, epoch: int) -> list[_Window]:
        """This rank's windows of an epoch, in stream order."""
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train_chunks))
        chunks = [self.train_chunks[i] for i in order]
        size = self.config.buffer_chunks
        windows = []
        for index, lo in enumerate(range(0, len(chunks), size)):
            if index % self.world_size != self.rank:
                continue
            group = tuple(chunks[lo : lo + size])
            rows = sum(hi - lo_ for lo_, hi in map(self.store.chunk_rows, group))
            windows.append(_Window(epoch, index, group, rows))
        return windows

    def _stream_rows(self, window: _Window) -> int:
        """Rows a window adds to the stream: its rows less those skipped for NaN/Inf (known once it was read)."""
        return window.rows - sum(self._skipped.get(chunk, 0) for chunk in window.chunks)

    def _locate(self, position: int) -> tuple[tuple[int, int], int]:
        """((epoch, window number within this rank's epoch), row offset) of a stream position."""
        epoch = 0
        while True:
            windows = self._epoch_windows(epoch)
            for number, window in enumerate(windows):
                rows = self._stream_rows(window)
                if position < rows:
                    return (epoch, number), position
                position -= rows
            epoch += 1

    def _windows_from(self, epoch: int, number: int) -> Iterator[_Window]:
        """This rank's windows from a position on, across epochs, forever."""
        while True:
            yield from self._epoch_windows(epoch)[number:]
            epoch, number = epoch + 1, 0

    def _start_reads(self, window: _Window) -> tuple[ActivationRows, torch.Tensor, list[Future]]:
        """Allocate the window and let reader threads fill it: each reads a chunk, normalises and converts it, and
        copies its rows to their permuted positions (disjoint per chunk), so all of it runs in parallel. The mask
        returned marks the positions to keep (False: a row holding NaN/Inf, skipped)."""
        store = self.store
        dest = torch.from_numpy(
            np.random.default_rng([self.config.seed, window.epoch, window.index]).permutation(window.rows)
        )
        shape = (window.rows, store.num_layers, store.d_model)
        rows = ActivationRows(
            torch.empty(shape, dtype=self.dtype),
            torch.empty(shape, dtype=self.dtype),
            torch.empty(window.rows, dtype=torch.int32),
        )
        keep = torch.ones(window.rows, dtype=torch.bool)
        reads, offset = [], 0
        for chunk in window.chunks:
            lo, hi = store.chunk_rows(chunk)
            reads.append(self._pool.submit(self._fill, rows, keep, dest[offset : offset + hi - lo], lo, hi))
            offset += hi - lo
        return rows, keep, reads

    def _fill(self, window: ActivationRows, keep: torch.Tensor, positions: torch.Tensor, lo: int, hi: int) -> None:
        compiled = self.store.torch_dtype == self.dtype == torch.bfloat16 and kernels.compiled_for(window.inputs)
        if compiled and self.store.quantized:
            bad = self._fill_quantized(window, self.store.read_raw(lo, hi), positions, lo)
        else:
            raw = self.store.read(lo, hi)
            bad = torch.zeros(len(raw.token_ids), dtype=torch.bool)
            place_rows(raw, self.normalizer, window, positions, bad)
            bad = _apply_policy(self.store, bad, lo, self.config.nonfinite)
        if bad.any():
            keep[positions[bad]] = False
            with self._skipped_lock:
                self._skipped[lo // self.store.rows_per_chunk] = int(bad.sum())

    def _fill_quantized(self, window: ActivationRows, raw: RawRows, positions: torch.Tensor, lo: int) -> torch.Tensor:
        """`_fill` of a quantised store's rows: dequantisation, normalisation, NaN/Inf check and scatter in one
        compiled pass each for inputs and targets, from the stored codes (the same values as dequantising with
        `store.read` and then `_prepare`); -> the rows to skip."""
        store, norm = self.store, self.normalizer
        reference = store.reference
        bad = torch.zeros(raw.num_rows, dtype=torch.bool)
        parts = (
            ("inputs", raw.inputs, raw.inputs_scale, window.inputs, norm and (norm.inputs_scale, norm.inputs_bias)),
            (
                "targets",
                raw.targets,
                raw.targets_scale,
                window.targets,
                norm and (norm.targets_scale, norm.targets_bias),
            ),
        )
        for name, codes, scale, out, affine in parts:
            assert scale is not None
            centre, spread = reference.tensors(name)
            kernels.dequantize_rows(
                torch.from_numpy(codes),
                store.quantization,
                torch.from_numpy(scale),
                centre,
                spread,
                out,
                norm_scale=affine[0] if affine else None,
                norm_bias=affine[1] if affine else None,
                positions=positions,
                bad=bad,
            )
        window.token_ids.index_copy_(0, positions, torch.from_numpy(raw.token_ids))
        return _apply_policy(self.store, bad, lo, self.config.nonfinite)

    def _blocks(self, where: tuple[int, int]) -> Iterator[ActivationRows]:
        """The windows from `where` on, read, each once the background thread asks for it; a run of windows longer
        than an epoch without a single finite row is an error."""
        empty = 0  # windows in a row left with no row at all
        for window in self._windows_from(*where):
            item, keep, reads = self._start_reads(window)
            for read in reads:
                read.result()
            if not keep.all():
                item = ActivationRows(*(t[keep] for t in item))
            empty = 0 if len(item.token_ids) else empty + 1
            if empty > self._max_empty_windows:
                raise StoreError(
                    f"{self.store.url}: a whole epoch of training rows holds NaN/Inf; nothing left to train on "
                    f"(`clt verify {self.store.url}` lists the rows)"
                )
            yield item

    def _failure(self, error: BaseException) -> StoreError:
        return StoreError(f"{self.store.url}: reading a training window failed: {error}")

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self._locate(self.position)[0][0]

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here: the stream position plus what the stream depends on."""
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "buffer_chunks": self.config.buffer_chunks,
            "holdout_fraction": self.config.holdout_fraction,
            "train_chunks": len(self.train_chunks),
            "num_rows": self.store.num_rows,
            "rank": self.rank,
            "world_size": self.world_size,
            **({"nonfinite_skipped": {str(c): n for c, n in sorted(self._skipped.items())}} if self._skipped else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self.state_dict()
        for key in (
            "version",
            "seed",
            "buffer_chunks",
            "holdout_fraction",
            "train_chunks",
            "num_rows",
            "rank",
            "world_size",
        ):
            if state.get(key) != expected[key]:
                raise StoreError(
                    f"sampler state was saved with {key}={state.get(key)!r} but this sampler has "
                    f"{key}={expected[key]!r}; resume with the same store and sampler settings"
                )
        if state["batch_size"] != self.config.batch_size and state["position"] % self.config.batch_size:
            raise StoreError("sampler state's position is not a whole number of batches of the new batch_size")
        self.close()
        self.position = int(state["position"])
        self._skipped = {int(c): int(n) for c, n in state.get("nonfinite_skipped", {}).items()}


def held_out_range(store: ActivationStore, holdout_fraction: float) -> tuple[int, int]:
    """Rows [start, stop) of the store's held-out chunks (the tail that training never samples)."""
    _, held = split_chunks(store.num_chunks, holdout_fraction)
    if len(held) == 0:
        raise StoreError(f"{store.url}: no held-out chunks with holdout_fraction={holdout_fraction}")
    return held.start * store.rows_per_chunk, store.num_rows


def held_out_batches(
    store: ActivationStore,
    normalizer: Normalizer | None,
    *,
    rows: tuple[int, int],
    sampler: SamplerConfig,
    batch_size: int | None = None,
) -> Iterator[ActivationRows]:
    """Rows [start, stop) in store order (the held-out rows of `held_out_range`, or part of them), prepared as
    training with `sampler` prepared its batches: rows holding NaN/Inf left out (`nonfinite: skip`) or refused
    (`error`), normalised with `normalizer` (the model's own), in the batches' dtype; `batch_size` (default the
    sampler's) rows a batch, the last may be smaller. The one reader of held-out rows: training's evaluation,
    convert and evaluate all read through it."""
    start, stop = rows
    dtype, nonfinite, batch_size = output_dtype(store, sampler), sampler.nonfinite, batch_size or sampler.batch_size
    buffer: list[ActivationRows] = []
    buffered = 0
    lo = start
    while lo < stop:
        hi = min(stop, (lo // store.rows_per_chunk + 1) * store.rows_per_chunk)  # one chunk (or its rest) a read
        part = _finite_only(store, store.read(lo, hi), lo, nonfinite)
        lo = hi
        buffer.append(part)
        buffered += len(part.token_ids)
        while buffered >= batch_size:
            joined = ActivationRows(*(torch.cat(ts) for ts in zip(*buffer, strict=True)))
            yield _prepare(ActivationRows(*(t[:batch_size] for t in joined)), normalizer, dtype)
            rest = ActivationRows(*(t[batch_size:] for t in joined))
            buffer, buffered = [rest], len(rest.token_ids)
    if buffered:
        joined = ActivationRows(*(torch.cat(ts) for ts in zip(*buffer, strict=True)))
        yield _prepare(joined, normalizer, dtype)
