"""Out-of-core global shuffle of an activation store into a new store.

Training wants rows in random order, but a store is far larger than memory. The shuffle is an explicit random
permutation applied in two passes through local temp disk:

1. *Spill*: `perm = permutation(N, seed)` gives the destination position of every source row. The destination is cut
   into buckets of `S` rows (a multiple of the output chunk, as large as the memory budget allows). Source chunks are
   read in parallel; each row is appended, as one fixed-size record (bucket-local position, token id, inputs,
   targets), to the spill file of its bucket. One file per bucket and one write per (chunk, bucket) under that
   bucket's lock keeps records whole whatever order the threads finish in.
2. *Gather*: each bucket in turn is read back, its records placed at their local positions in a bucket buffer, and the
   buffer appended to the new store in slabs of whole chunks (the writer copies a slab, then compresses and uploads
   its chunks concurrently).

The output depends only on the seed and the row count (not on the budget, workers or chunking), rows are moved in
their storage representation (bf16 as uint16 bits; a quantised store's codes with their scales, and its reference
copied) so they stay bit-identical, and peak memory is
`max(permutation + in-flight source chunks, bucket buffer + slab copy + chunks being encoded)` (see `plan_scramble`),
bounded by the budget, plus the interpreter's own baseline (~250 MB with torch). The permutation costs 4 bytes per row
(a SmolLM2 row is 69 KB) and is freed before pass 2. The temp disk must hold the whole store, uncompressed.
The summary reports these planned buffers against the budget, and the process's peak RSS (baseline included) apart.

With `storage_dtype` other than the source's, the scramble also converts: each slab is decoded as every reader
reads it (dequantised) and stored as the destination stores it, e.g. quantised to int8 with a reference computed
from the source's first rows (`quantize.REFERENCE_ROWS`), as an extraction into an int8 store computes its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from pydantic import ByteSize, Field
from tqdm import tqdm

from clt_core.config import Config
from clt_core.data.codecs import CODECS, Codec, check_codec
from clt_core.data.layout import StorageDType
from clt_core.data.lease import StoreLease
from clt_core.data.storage import StoreLocation, filesystem, parse_url
from clt_core.errors import StoreError

if TYPE_CHECKING:  # the store module imports torch: keep `clt --help` fast
    from clt_core.data.store import ActivationStore, StoreWriter

MiB = 2**20
# Memory the plan keeps free for what it does not model exactly (allocator slack, zarr's metadata and request buffers).
RESERVE_BYTES = 32 * MiB
# Source-chunk copies alive per in-flight pass-1 read: the decoded arrays, the record array and one gather temporary.
PASS1_COPIES = 3
# Records read from a spill file at a time in pass 2 (at most).
SPILL_BLOCK_BYTES = 16 * MiB
# Copies of each output chunk alive while zarr encodes and writes it, measured per destination kind: local (the chunk
# and its compressed bytes: 1.6-1.9 measured) and S3 (plus request bodies: 3.6 measured through s3fs/aiobotocore).
LOCAL_WRITE_COPIES, REMOTE_WRITE_COPIES = 2, 4
# More buckets than this are reopened for each append instead of keeping a file descriptor each.
MAX_OPEN_SPILL_FILES = 256
# glibc mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class ScrambleConfig(Config):
    """How to scramble a store."""

    seed: int = 0
    """Seed of the permutation: the same seed gives the same output store."""
    memory_budget: ByteSize = ByteSize(2 * 10**9)
    """Peak memory for the scramble's buffers, e.g. 2GB or 512MiB (the interpreter's ~250 MB come on top)."""
    workers: int = Field(4, ge=1, le=64)
    """Source chunks read and spilled in parallel (writes run zarr's concurrent chunk uploads)."""
    tmp_dir: str | None = None
    """Local directory for the spill files (default: the system temp directory)."""
    rows_per_chunk: int | None = Field(None, ge=1)
    """Rows per chunk of the output store (default: as the source)."""
    codec: Codec | None = None
    """Compression codec of the output store (default: the source's)."""
    storage_dtype: StorageDType | None = None
    """Storage dtype of the output store (default: the source's, rows copied bit-exactly): another one converts,
    e.g. int8 or fp8 quantises a bfloat16 store (docs/formats.md)."""


# ------------------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class ScramblePlan:
    """How a scramble fits in its memory budget; all sizes in bytes."""

    num_rows: int
    row_bytes: int
    bucket_rows: int
    """Destination rows per bucket: a multiple of the output chunk."""
    num_buckets: int
    slab_rows: int
    """Rows handed to the store writer at once in pass 2 (it copies them, then writes their chunks concurrently)."""
    block_rows: int
    """Spilled records read back at once in pass 2."""
    read_window: int
    """Source chunks read and spilled at once in pass 1."""
    perm_bytes: int
    pass1_bytes: int
    """Modelled peak of pass 1: the permutation plus in-flight source chunks."""
    pass2_bytes: int
    """Modelled peak of pass 2: bucket buffer, the writer's copy of a slab, zarr's chunks in flight, a spill block."""
    budget: int

    @property
    def buffer_bytes(self) -> int:
        """Modelled peak of the scramble's own buffers: the larger pass."""
        return max(self.pass1_bytes, self.pass2_bytes)

    @property
    def peak_bytes(self) -> int:
        """The buffers plus `RESERVE_BYTES`: what the plan keeps within the budget."""
        return self.buffer_bytes + RESERVE_BYTES


def zarr_write_concurrency() -> int:
    """Chunks zarr encodes and writes at once per array (its `async.concurrency`)."""
    import zarr

    return max(1, int(zarr.config.get("async.concurrency")))


def plan_scramble(
    *,
    num_rows: int,
    row_bytes: int,
    src_rows_per_chunk: int,
    dst_rows_per_chunk: int,
    workers: int,
    budget: int,
    write_concurrency: int | None = None,
    remote_dst: bool = False,
) -> ScramblePlan:
    """Choose the bucket size and read window for a budget; a StoreError says how much is needed if it cannot fit.

    `row_bytes` is one row in storage (inputs + targets + token id); `remote_dst` for an S3 destination, whose
    uploads hold more copies. Every buffer alive at the same time is counted, rounded up from measurements, so the
    process stays under the budget plus its baseline (Python, torch, zarr: about 250 MB; with s3fs about 330 MB).
    Passes 1 and 2 never overlap, so the larger one counts. When memory is short, zarr gets fewer chunks in flight
    (the slab shrinks) before the bucket shrinks below a slab.
    """
    if num_rows < 1:
        raise StoreError("nothing to scramble: the source store has no committed rows")
    conc = write_concurrency or zarr_write_concurrency()
    perm_bytes = num_rows * (4 if num_rows < 2**31 else 8)
    src_chunk = src_rows_per_chunk * row_bytes
    dst_chunk = dst_rows_per_chunk * row_bytes
    usable = budget - RESERVE_BYTES

    free1 = usable - perm_bytes
    window = min(workers, free1 // (PASS1_COPIES * src_chunk)) if free1 > 0 else 0

    # Pass 2 with c chunks per bucket: the bucket (c), the writer's copy of one slab (min(c, conc)), zarr's in-flight
    # chunks, `copies` times each (copies * min(c, conc)), and one spill block.
    copies = REMOTE_WRITE_COPIES if remote_dst else LOCAL_WRITE_COPIES
    block = min(SPILL_BLOCK_BYTES, max(row_bytes, dst_chunk))
    chunks = (usable - block - (1 + copies) * conc * dst_chunk) // dst_chunk
    if chunks < conc:
        chunks = (usable - block) // ((2 + copies) * dst_chunk)
    total_chunks = math.ceil(num_rows / dst_rows_per_chunk)
    chunks = min(chunks, total_chunks, (2**31 - 1) // dst_rows_per_chunk)

    if window < 1 or chunks < 1:
        need = max(perm_bytes + PASS1_COPIES * src_chunk, (2 + copies) * dst_chunk + block) + RESERVE_BYTES
        raise StoreError(
            f"memory budget {_fmt_bytes(budget)} is too small to scramble {num_rows:,} rows of {row_bytes:,} bytes: "
            f"it needs at least {_fmt_bytes(need)} (permutation {_fmt_bytes(perm_bytes)}, source chunk "
            f"{_fmt_bytes(src_chunk)}, output chunk {_fmt_bytes(dst_chunk)} held {2 + copies} times while written); "
            "raise --memory-budget or lower --rows-per-chunk"
        )
    slab = min(chunks, conc)
    return ScramblePlan(
        num_rows=num_rows,
        row_bytes=row_bytes,
        bucket_rows=chunks * dst_rows_per_chunk,
        num_buckets=math.ceil(num_rows / (chunks * dst_rows_per_chunk)),
        slab_rows=slab * dst_rows_per_chunk,
        block_rows=max(1, block // (row_bytes + 4)),  # a record adds its bucket-local position
        read_window=int(window),
        perm_bytes=perm_bytes,
        pass1_bytes=perm_bytes + int(window) * PASS1_COPIES * src_chunk,
        pass2_bytes=(chunks + (1 + copies) * slab) * dst_chunk + block,
        budget=budget,
    )


def permutation(num_rows: int, seed: int) -> np.ndarray:
    """Destination position of each source row; int32 below 2**31 rows to halve its memory (shuffled in place)."""
    perm = np.arange(num_rows, dtype=np.int32 if num_rows < 2**31 else np.int64)
    np.random.default_rng(seed).shuffle(perm)
    return perm


# --------------------------------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class ScrambleSummary:
    """What a scramble did and what it cost."""

    src: str
    dst: str
    rows: int
    bytes: int
    """Row data moved (inputs + targets + token ids, in storage dtype)."""
    seconds: float
    num_buckets: int
    bucket_rows: int
    peak_rss_bytes: int
    """Peak resident memory of the whole process so far: Python, torch and the libraries come on top of the buffers,
    so this exceeds the budget without breaking it."""
    memory_budget: int
    """The budget that bounds the scramble's own buffers (`ScrambleConfig.memory_budget`)."""
    buffer_bytes: int
    """Planned peak of the scramble's own buffers (`ScramblePlan.buffer_bytes`), within the budget."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"scrambled {self.rows:,} rows ({_fmt_bytes(self.bytes)}) from {self.src} to {self.dst} in "
            f"{self.seconds:.1f} s ({self.mb_per_s:.1f} MB/s); {self.num_buckets} bucket(s) of {self.bucket_rows:,} "
            f"rows; buffers {_fmt_bytes(self.buffer_bytes)} of the {_fmt_bytes(self.memory_budget)} budget (planned); "
            f"process peak RSS {_fmt_bytes(self.peak_rss_bytes)} (Python, torch and libraries included)"
        )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: exec carries the parent's peak over into it, so a child of a
    big process would report its parent's memory. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ----------------------------------------------------------------------------------------------------- spill files
def record_dtype(num_layers: int, d_model: int, storage_dtype: np.dtype, *, scales: bool = False) -> np.dtype:
    """One spilled row: bucket-local destination position, token id, inputs and targets (packed, fixed size), and
    with `scales` (a quantised store's rows) their float32 scales per layer."""
    shape = (num_layers, d_model)
    fields: list[tuple[Any, ...]] = [
        ("pos", np.int32),
        ("id", np.int32),
        ("x", storage_dtype, shape),
        ("y", storage_dtype, shape),
    ]
    if scales:
        fields += [("xs", np.float32, (num_layers,)), ("ys", np.float32, (num_layers,))]
    return np.dtype(fields)


class _SpillFiles:
    """Per-bucket append-only files; a lock per bucket keeps each (chunk, bucket) fragment contiguous."""

    def __init__(self, root: Path, num_buckets: int) -> None:
        self.paths = [root / f"bucket-{k:06d}.rec" for k in range(num_buckets)]
        self._locks = [threading.Lock() for _ in range(num_buckets)]
        self._keep_open = num_buckets <= MAX_OPEN_SPILL_FILES
        self._files: list[BinaryIO | None] = [None] * num_buckets

    def append(self, bucket: int, records: np.ndarray) -> None:
        data = records.view(np.uint8).data  # a memoryview (numpy declares the buffer protocol for Python 3.12+ only)
        with self._locks[bucket]:
            if not self._keep_open:
                with self.paths[bucket].open("ab") as out:
                    out.write(data)
                return
            f = self._files[bucket]
            if f is None:
                f = self._files[bucket] = self.paths[bucket].open("ab")
            f.write(data)

    def close(self) -> None:
        for k, f in enumerate(self._files):
            if f is not None:
                f.close()
                self._files[k] = None


# ----------------------------------------------------------------------------------------------------- main entry
def scramble_store(
    src_url: str,
    dst_url: str,
    config: ScrambleConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> ScrambleSummary:
    """Write every committed row of `src_url` exactly once, in a seeded random order, to a new store at `dst_url`.

    The destination gets the source's metadata, norm stats, codec and storage dtype (unless `config.codec`,
    `config.storage_dtype`) with `scrambled=True`, `parent=src_url` and `seed=config.seed`. `scrambled` is set last,
    so an interrupted run never looks finished; a failed run removes the partial destination and always removes its
    temp files. Converted rows change, so the norm stats of a converted store are recomputed (`compute_norm_stats`).
    """
    from clt_core.data.layout import split_storage_dtype, stored_np
    from clt_core.data.store import ActivationStore, check_destination

    t0 = time.perf_counter()
    src_loc, dst_loc = parse_url(src_url), parse_url(dst_url)
    _check_distinct(src_loc, dst_loc)
    src = ActivationStore.open(src_loc.url, mode="r")
    n = src.num_rows
    dst_rows_per_chunk = config.rows_per_chunk or src.rows_per_chunk
    codec = config.codec or src.codec
    if codec not in CODECS:
        raise StoreError(f"{src.url}: its codec ({codec}) is not one clt writes; choose one with --codec")
    storage = config.storage_dtype or src.storage_dtype
    dtype, quantization = split_storage_dtype(storage)
    # Converting holds each slab decoded (bf16) and encoded too: plan with the largest of the three row forms.
    bf16_row = 2 * src.num_layers * src.d_model * 2 + 4
    dst_row = 2 * src.num_layers * src.d_model * stored_np(dtype, quantization).itemsize + 4
    dst_row += 2 * src.num_layers * 4 if quantization != "none" else 0
    plan_row = src.row_bytes if storage == src.storage_dtype else max(src.row_bytes, dst_row, bf16_row)
    plan = plan_scramble(
        num_rows=n,
        row_bytes=plan_row,
        src_rows_per_chunk=src.rows_per_chunk,
        dst_rows_per_chunk=dst_rows_per_chunk,
        workers=config.workers,
        budget=int(config.memory_budget),
        remote_dst=not dst_loc.is_local,
    )
    rec_dt = record_dtype(src.num_layers, src.d_model, stored_np(src.dtype, src.quantization), scales=src.quantized)
    with StoreLease(dst_loc.url, "scramble", what=f"a scramble of {src_loc.url}"):  # one writer of the destination
        check_destination(dst_loc.url, overwrite)  # before any expensive work
        return _scramble(
            src, dst_loc, config, plan, dst_rows_per_chunk, codec, storage, rec_dt, overwrite, progress, t0
        )


def _scramble(
    src: ActivationStore,
    dst_loc: StoreLocation,
    config: ScrambleConfig,
    plan: ScramblePlan,
    dst_rows_per_chunk: int,
    codec: str,
    storage: StorageDType,
    rec_dt: np.dtype,
    overwrite: bool,
    progress: bool,
    t0: float,
) -> ScrambleSummary:
    from clt_core.data.layout import split_storage_dtype
    from clt_core.data.norm_stats import compute_norm_stats
    from clt_core.data.quantize import REFERENCE_ROWS, reference_from_rows
    from clt_core.data.store import ActivationStore, StoreWriter

    src_loc, n = parse_url(src.url), src.num_rows
    dtype, quantization = split_storage_dtype(storage)
    convert = storage != src.storage_dtype
    tmp_root = _make_tmp_dir(config.tmp_dir, need=n * rec_dt.itemsize)

    created = False
    try:
        with _released_memory():
            info = src.info.model_dump(mode="json")
            for key in ("format_version", "num_layers", "d_model", "dtype", "quantization", "rows_committed"):
                info.pop(key, None)
            info.pop("created_at", None)
            info.update(scrambled=False, parent=src_loc.url, seed=config.seed)
            reference = None
            if quantization != "none" and not convert:
                reference = src.reference  # copied: the codes keep their meaning
            elif quantization != "none":  # from the source's first rows, as an extraction computes its own
                first = src.read(0, min(n, REFERENCE_ROWS))
                reference = reference_from_rows(first.inputs, first.targets)
            dst = ActivationStore.create(
                dst_loc.url,
                num_layers=src.num_layers,
                d_model=src.d_model,
                dtype=dtype,
                quantization=quantization,
                reference=reference,
                rows_per_chunk=dst_rows_per_chunk,
                compression=check_codec(codec),
                overwrite=overwrite,
                **info,
            )
            created = True
            total = n * src.row_bytes
            with tqdm(
                total=2 * total, unit="B", unit_scale=True, desc="scramble", disable=not progress, smoothing=0.1
            ) as bar:
                spill = _SpillFiles(tmp_root, plan.num_buckets)
                try:
                    bar.set_description("scramble 1/2 spill")
                    perm = permutation(n, config.seed)
                    _spill_pass(src, perm, plan, spill, rec_dt, bar)
                    del perm  # pass 2 gets its memory
                finally:
                    spill.close()
                bar.set_description("scramble 2/2 write")
                writer = StoreWriter(dst)
                _gather_pass(src if convert else None, writer, plan, spill, rec_dt, bar)
                writer.close()
            if dst.num_rows != n:
                raise StoreError(f"{dst.url}: wrote {dst.num_rows} rows, expected {n}; the scramble is incomplete")
            stats = src.read_norm_stats()
            if stats is not None and convert:  # the stored values changed: stats of the rows the store now holds
                compute_norm_stats(dst, workers=config.workers, progress=False)
            elif stats is not None:
                dst.write_norm_stats(stats)
            dst.update_info(scrambled=True)  # the completion mark
    except BaseException:
        if created:
            _remove_quietly(dst_loc)
        raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return ScrambleSummary(
        src=src_loc.url,
        dst=dst_loc.url,
        rows=n,
        bytes=total,
        seconds=time.perf_counter() - t0,
        num_buckets=plan.num_buckets,
        bucket_rows=plan.bucket_rows,
        peak_rss_bytes=peak_rss_bytes(),
        memory_budget=int(config.memory_budget),
        buffer_bytes=plan.buffer_bytes,
    )


def _spill_pass(
    src: ActivationStore, perm: np.ndarray, plan: ScramblePlan, spill: _SpillFiles, rec_dt: np.dtype, bar: tqdm
) -> None:
    """Pass 1: read source chunks (`plan.read_window` at once) and append each row to its bucket's spill file."""
    bucket_rows = plan.bucket_rows

    def spill_chunk(chunk: int) -> int:
        start, stop = src.chunk_rows(chunk)
        raw = src.read_raw(start, stop)
        pos = perm[start:stop].astype(np.int64)
        bucket = pos // bucket_rows
        order = np.argsort(bucket, kind="stable")
        bucket = bucket[order]
        rec = np.empty(stop - start, rec_dt)
        rec["pos"] = pos[order] - bucket * bucket_rows
        rec["id"] = raw.token_ids[order]
        rec["x"] = raw.inputs[order]
        rec["y"] = raw.targets[order]
        if raw.inputs_scale is not None and raw.targets_scale is not None:
            rec["xs"], rec["ys"] = raw.inputs_scale[order], raw.targets_scale[order]
        del raw
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rec)], strict=True):
            spill.append(int(bucket[lo]), rec[lo:hi])
        return (stop - start) * src.row_bytes

    pending: set[Future[int]] = set()
    with ThreadPoolExecutor(plan.read_window, thread_name_prefix="clt-scramble") as pool:
        try:
            for chunk in range(src.num_chunks):
                if len(pending) >= plan.read_window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    bar.update(sum(f.result() for f in done))
                pending.add(pool.submit(spill_chunk, chunk))
            done, pending = wait(pending)
            bar.update(sum(f.result() for f in done))
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _gather_pass(
    convert_from: ActivationStore | None,
    writer: StoreWriter,
    plan: ScramblePlan,
    spill: _SpillFiles,
    rec_dt: np.dtype,
    bar: tqdm,
) -> None:
    """Pass 2: rebuild each bucket in destination order from its spill file and append it to the new store: as
    stored, or (`convert_from`: the source) decoded as the source's readers read it, for the writer to encode."""
    from clt_core.data.layout import RawRows

    s = plan.bucket_rows
    buf_x = np.empty((s, *rec_dt["x"].shape), rec_dt["x"].base)
    buf_y = np.empty((s, *rec_dt["y"].shape), rec_dt["y"].base)
    buf_ids = np.empty(s, np.int32)
    scaled = "xs" in (rec_dt.names or ())
    buf_xs = np.empty((s, *rec_dt["xs"].shape), np.float32) if scaled else None
    buf_ys = np.empty((s, *rec_dt["ys"].shape), np.float32) if scaled else None
    block_rows = min(s, plan.block_rows)
    block = np.empty(block_rows, rec_dt)
    block_bytes = block.view(np.uint8).data
    for k, path in enumerate(spill.paths):
        n_k = min(s, plan.num_rows - k * s)
        size = path.stat().st_size if path.exists() else 0
        if size != n_k * rec_dt.itemsize:
            raise StoreError(
                f"spill file {path} holds {size / rec_dt.itemsize:.0f} rows, bucket {k} needs {n_k}; "
                "the temp directory was changed or ran out of space during the scramble"
            )
        with path.open("rb") as f:
            done = 0
            while done < n_k:
                m = min(block_rows, n_k - done)
                nbytes = m * rec_dt.itemsize
                if f.readinto(block_bytes[:nbytes]) != nbytes:
                    raise StoreError(f"spill file {path} is shorter than it was a moment ago")
                recs = block[:m]
                pos = recs["pos"]
                buf_x[pos] = recs["x"]
                buf_y[pos] = recs["y"]
                buf_ids[pos] = recs["id"]
                if buf_xs is not None and buf_ys is not None:
                    buf_xs[pos], buf_ys[pos] = recs["xs"], recs["ys"]
                done += m
        path.unlink()  # give the temp disk back as we go
        # Slabs of whole chunks: the writer copies only a slab at a time and writes its chunks concurrently.
        for lo in range(0, n_k, plan.slab_rows):
            hi = min(n_k, lo + plan.slab_rows)
            raw = RawRows(buf_x, buf_y, buf_ids, buf_xs, buf_ys).rows(lo, hi)
            if convert_from is None:
                writer.append_raw(raw)
            else:
                rows = convert_from.decode(raw)
                writer.append(rows.inputs, rows.targets, raw.token_ids)
            bar.update((hi - lo) * (rec_dt.itemsize - 4))  # the source's rows (a record adds its position)


# ------------------------------------------------------------------------------------------------------- checks
@contextlib.contextmanager
def _released_memory() -> Iterator[None]:
    """Make glibc hand freed chunk-sized buffers back to the OS while scrambling.

    After the first large free glibc raises its mmap threshold (up to 32 MiB); from then on the few-MiB chunk buffers
    that reader and encoder threads allocate come from per-thread arenas that keep the memory once freed: measured
    +100-170 MB of RSS that no budget can see. A fixed 1 MiB threshold maps them and unmaps them on free. Dynamic
    thresholds cannot be switched back on, so afterwards glibc's steady-state values are set (32 MiB, trim 64 MiB).
    """
    mallopt = None
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL(None).mallopt
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 1 * MiB)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, 32 * MiB)
        mallopt(_M_TRIM_THRESHOLD, 64 * MiB)


def _check_distinct(src: StoreLocation, dst: StoreLocation) -> None:
    """Refuse a destination that is, contains or lies inside the source: creating it would destroy the source."""
    if src.protocol != dst.protocol:
        return
    a, b = src.path.rstrip("/"), dst.path.rstrip("/")
    if a == b:
        raise StoreError(f"source and destination are the same store ({src.url}); scramble into a new URL")
    if b.startswith(a + "/") or a.startswith(b + "/"):
        raise StoreError(f"destination {dst.url} overlaps the source {src.url}; choose a location outside it")


def _make_tmp_dir(tmp_dir: str | None, need: int) -> Path:
    """A fresh spill directory, after checking its disk can hold the spilled store (`need` bytes)."""
    parent = Path(tmp_dir).expanduser() if tmp_dir else Path(tempfile.gettempdir())
    if not parent.is_dir():
        raise StoreError(f"temp directory {parent} does not exist; create it or pass another --tmp-dir")
    if _is_ram_backed(parent):
        warnings.warn(
            f"temp directory {parent} is in RAM (tmpfs): the spill files will take memory outside the budget; "
            "pass --tmp-dir on a disk",
            stacklevel=3,
        )
    free = shutil.disk_usage(parent).free
    margin = 64 * MiB
    if free < need + margin:
        raise StoreError(
            f"temp directory {parent} has {_fmt_bytes(free)} free but the scramble spills {_fmt_bytes(need)} "
            "(the whole store, uncompressed); pass --tmp-dir on a larger local disk"
        )
    return Path(tempfile.mkdtemp(prefix="clt-scramble-", dir=parent))


def _is_ram_backed(path: Path) -> bool:
    """Whether `path` lies on tmpfs/ramfs (Linux: the mount table), as /tmp does on some distributions."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    target, best, fstype = str(path.resolve()), "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, fields[2]
    return fstype in {"tmpfs", "ramfs"}


def _remove_quietly(loc: StoreLocation) -> None:
    """Best-effort removal of a partial destination after a failure (the original error matters more)."""
    try:
        if loc.is_local:
            shutil.rmtree(loc.path, ignore_errors=True)
        else:
            fs = filesystem(loc)
            if fs.exists(loc.path):
                fs.rm(loc.path, recursive=True)
    except Exception:  # never mask the error that made us clean up
        pass


__all__ = [
    "ScrambleConfig",
    "ScramblePlan",
    "ScrambleSummary",
    "permutation",
    "plan_scramble",
    "record_dtype",
    "scramble_store",
]
