"""`clt verify`: check that an activation store is complete, consistent and readable before spending compute on it.

What is checked, and how severe a finding is:

- problems (the report fails, `clt verify` exits 1): the store cannot be opened (bad URL, missing or invalid
  `clt_dataset` metadata, format_version mismatch, array shapes/dtypes/chunking that contradict the metadata, arrays
  shorter than `rows_committed`); a `logical_dtype` attribute missing on `inputs`/`targets`; `token_ids` not a 1-D
  int32 array; norm stats that exist but are incomplete, mis-shaped, non-finite or negative; a quantised store
  holding rows without its complete quantisation reference; a committed chunk whose object is missing (Zarr would
  silently read it as zeros); and, with `scan=True`, chunks that fail to decode (truncated or overwritten objects),
  rows holding NaN/Inf (in a quantised store: as they read back, dequantised), and token ids below -1.
- warnings (reported, but the store is usable): no norm stats yet — they are a separate pipeline step
  (`clt norm-stats`) and a store straight out of extraction legitimately lacks them, so their absence must not fail
  a check run between the two steps; norm stats computed over a different number of rows than are committed (stale
  after an append; rows holding NaN/Inf, which norm stats leave out, are not held against them when the scan counted
  them); chunk objects past `rows_committed` and leftover `*.partial` files (an interrupted writer: the
  next append overwrites them).

The scan reads every committed chunk of the three arrays with a bounded window of parallel reads, so a remote store
is read at full bandwidth without holding more than a few chunks in memory.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from clt_core.data.layout import SCALE_ARRAYS, RawRows
from clt_core.data.norm_stats import finite_rows
from clt_core.data.shards import describe_progress
from clt_core.data.storage import filesystem, storage_errors
from clt_core.errors import StoreError, first_line

if TYPE_CHECKING:
    from clt_core.data.store import ActivationStore

MAX_LISTED = 5
"""How many chunk indices or row indices a message lists before summarising the rest as a count."""
MAX_STORAGE_ERRORS = 3
"""Storage (not decoding) errors after which the scan stops: they are rarely specific to one chunk."""
_BF16_EXPONENT = np.uint16(0x7F80)


@dataclass
class ChunkScan:
    """What reading one committed chunk found."""

    chunk: int
    start: int
    stop: int
    errors: dict[str, str] = field(default_factory=dict)
    """Array name -> why it could not be decoded."""
    storage_error: str | None = None
    """Why the read failed below the codec (network, credentials): usually not specific to this chunk."""
    nonfinite_rows: list[int] = field(default_factory=list)
    """Absolute indices of rows with NaN/Inf in inputs or targets."""
    bad_token_rows: int = 0
    """Token ids below -1 in this chunk."""


@dataclass
class VerifyReport:
    """The findings of `verify_store`. `ok` is False exactly when there are problems; warnings never fail it."""

    url: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    opened: bool = False
    scanned: bool = False
    rows: int = 0
    chunks: int = 0
    chunks_scanned: int = 0
    bad_chunks: list[int] = field(default_factory=list)
    """Committed chunks that are missing or fail to decode (sorted)."""
    nonfinite_rows: int = 0
    nonfinite_examples: list[int] = field(default_factory=list)
    """The first few row indices holding NaN/Inf."""
    geometry: str = ""
    seconds: float = 0.0
    norm_stats_rows: int | None = None
    """The rows the norm stats cover (None: there are none)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """A few lines for a terminal: verdict, geometry, then every problem and warning."""
        if not self.opened:
            head = f"{self.url}: FAILED, the store could not be opened"
        else:
            what = f"{self.rows:,} rows in {self.chunks:,} chunks ({self.geometry})"
            how = (
                f"read {self.chunks_scanned:,}/{self.chunks:,} chunks" if self.scanned else "metadata only (no --scan)"
            )
            verdict = "OK" if self.ok else f"FAILED, {len(self.problems)} problem(s)"
            head = f"{self.url}: {verdict}: {what}; {how} in {self.seconds:.1f} s"
        lines = [head]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _nonfinite_mask(a: np.ndarray, dtype: str) -> np.ndarray:
    """Per row of a stored `[n, L, d]` block: whether any value is NaN or ±Inf (bf16 bits: exponent all ones)."""
    bad = ((a & _BF16_EXPONENT) == _BF16_EXPONENT) if dtype == "bfloat16" else ~np.isfinite(a)
    return bad.reshape(len(a), -1).any(axis=1)


def verify_store(url: str, *, scan: bool = True, progress: bool = True, workers: int = 8) -> VerifyReport:
    """Check the store at `url` (see the module docstring for what and how severe); never raises for a bad store."""
    from clt_core.data.store import ActivationStore

    t0 = time.monotonic()
    report = VerifyReport(url=url)
    try:
        store = ActivationStore.open(url, mode="r")
    except StoreError as err:
        report.problems.append(str(err))
        return _done(report, t0)
    except Exception as err:  # a corrupt metadata document can surface as anything; report it, don't crash
        report.problems.append(f"{url}: cannot open the store ({first_line(err, with_type=True)})")
        return _done(report, t0)
    report.url = store.url
    report.opened = True
    report.rows = store.num_rows
    report.chunks = store.num_chunks
    stored = store.dtype if not store.quantized else f"{store.quantization} (read as {store.dtype})"
    report.geometry = f"{store.num_layers} layers x {store.d_model}, {stored}, {store.rows_per_chunk} rows per chunk"
    for check in (_check_metadata, _check_norm_stats, _check_chunk_objects):
        try:
            check(store, report)
        except StoreError as err:
            report.problems.append(str(err))
        except Exception as err:
            name = check.__name__.removeprefix("_check_").replace("_", " ")
            report.problems.append(f"{name}: {first_line(err, with_type=True)}")
    if scan:
        _scan(store, report, progress=progress, workers=workers)
    _check_norm_stats_rows(store, report)
    return _done(report, t0)


def _done(report: VerifyReport, t0: float) -> VerifyReport:
    report.bad_chunks = sorted(set(report.bad_chunks))
    report.seconds = time.monotonic() - t0
    return report


def _check_metadata(store: ActivationStore, report: VerifyReport) -> None:
    """What `ActivationStore.open` tolerates but the format requires, and traces of an interrupted writer."""
    if store.num_rows < 0:
        report.problems.append(f"rows_committed is negative ({store.num_rows})")
    for arr in (store.inputs, store.targets):
        if "logical_dtype" not in arr.attrs:
            report.problems.append(
                f"'{arr.basename}' lacks the array attribute logical_dtype (should be {store.dtype!r}); other readers "
                "cannot tell what its values mean"
            )
    ids = store.token_ids
    if ids.ndim != 1 or ids.dtype != np.int32:
        report.problems.append(f"'token_ids' is {ids.dtype} with shape {ids.shape}; the format needs a 1-D int32 array")
    if store.quantized and store.load_reference() is None:
        missing = f"the {store.quantization} store has no complete quantisation reference"
        if store.num_rows:
            report.problems.append(f"{missing}: its rows cannot be read")
        else:
            report.warnings.append(f"{missing} yet (a writer computes it before the first row)")
    lengths = {a.basename: a.shape[0] for a in store.row_arrays}
    extra = max(lengths.values()) - store.num_rows
    if (sharded := describe_progress(store)) is not None:
        report.warnings.append(sharded)
    elif extra > 0:
        sizes = ", ".join(f"{k} {v:,}" for k, v in lengths.items())
        report.warnings.append(
            f"the arrays are longer than rows_committed={store.num_rows:,} ({sizes}): an interrupted write; the "
            "extra rows are invisible and the next append overwrites them"
        )


def _check_norm_stats(store: ActivationStore, report: VerifyReport) -> None:
    stats = store.read_norm_stats()  # StoreError when incomplete: reported as a problem by the caller
    if stats is None:
        report.warnings.append(f"no norm stats; compute them with `clt norm-stats {store.url}` before training")
        return
    shape = (store.num_layers, store.d_model)
    for name in stats.ARRAYS:
        value = np.asarray(getattr(stats, name))
        if value.shape != shape:
            report.problems.append(f"norm stat {name} has shape {value.shape}, the store needs {shape}")
        elif not np.isfinite(value).all():
            report.problems.append(f"norm stat {name} holds {int((~np.isfinite(value)).sum())} NaN/Inf values")
        elif name.endswith("_std") and (value < 0).any():
            report.problems.append(f"norm stat {name} has negative values")
    report.norm_stats_rows = stats.count


def _check_norm_stats_rows(store: ActivationStore, report: VerifyReport) -> None:
    """Stale norm stats: they cover other rows than the committed ones, less those holding NaN/Inf (left out)."""
    count = report.norm_stats_rows
    if count is None or count in (store.num_rows, store.num_rows - report.nonfinite_rows):
        return
    report.warnings.append(
        f"norm stats cover {count:,} rows but {store.num_rows:,} are committed; recompute them with "
        f"`clt norm-stats {store.url}`"
    )


def _check_chunk_objects(store: ActivationStore, report: VerifyReport) -> None:
    """List the chunk objects: a missing committed chunk reads back as zeros without any error, so only a listing
    finds it. Also notes chunks past the committed rows and `*.partial` files left by a killed local writer."""
    fs = filesystem(store.loc)
    with storage_errors(store.url, "list the chunk objects"):
        for arr in store.row_arrays:
            prefix = f"{store.loc.path}/{arr.path}/"
            found = {p.removeprefix(prefix) for p in fs.find(prefix + "c")}
            partial = {p for p in found if p.endswith(".partial")}
            trail = (0,) * (arr.ndim - 1)
            expected = [arr.metadata.encode_chunk_key((i, *trail)) for i in range(store.num_chunks)]
            missing = [i for i, key in enumerate(expected) if key not in found]
            beyond = len(found - partial - set(expected))
            if missing:
                report.problems.append(
                    f"'{arr.basename}': {len(missing):,} committed chunk object(s) missing, which would read as "
                    f"zeros: {_chunk_list(store, missing)}"
                )
                report.bad_chunks += missing
            if beyond:
                report.warnings.append(
                    f"'{arr.basename}': {beyond:,} chunk object(s) past the committed rows (an interrupted write; "
                    "the next append overwrites them)"
                )
            if partial:
                report.warnings.append(
                    f"'{arr.basename}': {len(partial):,} leftover *.partial file(s) from a killed writer "
                    "(safe to delete)"
                )


def _chunk_list(store: ActivationStore, chunks: list[int]) -> str:
    """`chunk 3 (rows 24..31), chunk 7 (rows 56..63) and 4 more`."""
    parts = []
    for i in chunks[:MAX_LISTED]:
        start, stop = store.chunk_rows(i)
        parts.append(f"chunk {i} (rows {start}..{stop - 1})")
    rest = len(chunks) - MAX_LISTED
    return ", ".join(parts) + (f" and {rest:,} more" if rest > 0 else "")


def _read_chunk(store: ActivationStore, chunk: int) -> ChunkScan:
    """Decode one committed chunk of each array and look for non-finite rows and invalid token ids."""
    start, stop = store.chunk_rows(chunk)
    result = ChunkScan(chunk, start, stop)
    nonfinite = np.zeros(stop - start, dtype=bool)
    decoded: dict[str, np.ndarray] = {}
    for arr in store.row_arrays:
        try:
            with storage_errors(store.url, f"read chunk {chunk} of '{arr.basename}'"):
                data = np.asarray(arr[start:stop])
        except StoreError as err:
            result.storage_error = str(err)
            return result
        except Exception as err:  # codec and reshape errors: the object is truncated or overwritten
            result.errors[arr.basename] = first_line(err, with_type=True)
            continue
        decoded[arr.basename] = data
        if arr is store.token_ids:
            result.bad_token_rows = int((data < -1).sum())
        elif not store.quantized:
            nonfinite |= _nonfinite_mask(data, store.dtype)
    if store.quantized and not result.errors and store.load_reference() is not None:  # the values as read back
        rows = store.decode(RawRows(*(decoded[name] for name in ("inputs", "targets", "token_ids", *SCALE_ARRAYS))))
        nonfinite |= ~finite_rows(rows.inputs, rows.targets).numpy()
    result.nonfinite_rows = (np.flatnonzero(nonfinite) + start).tolist()
    return result


def _scan_results(store: ActivationStore, workers: int) -> Iterator[ChunkScan]:
    """Chunk results in order, with up to `2 * workers` reads in flight."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="clt-verify") as pool:
        pending: deque[Future[ChunkScan]] = deque()
        try:
            for chunk in range(store.num_chunks):
                pending.append(pool.submit(_read_chunk, store, chunk))
                if len(pending) >= 2 * max(1, workers):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _scan(store: ActivationStore, report: VerifyReport, *, progress: bool, workers: int) -> None:
    from tqdm import tqdm

    report.scanned = True
    undecodable: list[ChunkScan] = []
    failed_reads: list[str] = []
    bad_token_ids = 0
    with tqdm(total=store.num_rows, unit="row", unit_scale=True, desc="verify", disable=not progress) as bar:
        for res in _scan_results(store, workers):
            report.chunks_scanned += 1
            bar.update(res.stop - res.start)
            if res.storage_error:
                failed_reads.append(res.storage_error)
                if len(failed_reads) >= MAX_STORAGE_ERRORS:
                    break
                continue
            if res.errors:
                undecodable.append(res)
            report.nonfinite_rows += len(res.nonfinite_rows)
            room = MAX_LISTED - len(report.nonfinite_examples)
            report.nonfinite_examples += res.nonfinite_rows[: max(room, 0)]
            bad_token_ids += res.bad_token_rows
    if failed_reads:
        stopped = "; scan stopped early" if len(failed_reads) >= MAX_STORAGE_ERRORS else ""
        report.problems.append(f"{len(failed_reads)} chunk read(s) failed{stopped}; last: {failed_reads[-1]}")
    for res in undecodable[:MAX_LISTED]:
        why = "; ".join(f"'{name}': {msg}" for name, msg in res.errors.items())
        report.problems.append(f"chunk {res.chunk} (rows {res.start}..{res.stop - 1}) cannot be decoded: {why}")
    if len(undecodable) > MAX_LISTED:
        report.problems.append(f"… and {len(undecodable) - MAX_LISTED:,} more chunks that cannot be decoded")
    report.bad_chunks += [res.chunk for res in undecodable]
    if report.nonfinite_rows:
        more = report.nonfinite_rows - len(report.nonfinite_examples)
        rows = ", ".join(map(str, report.nonfinite_examples)) + (f" and {more:,} more" if more > 0 else "")
        report.problems.append(f"{report.nonfinite_rows:,} row(s) hold NaN/Inf in inputs or targets: row {rows}")
    if bad_token_ids:
        report.problems.append(f"{bad_token_ids:,} token id(s) are below -1 (-1 marks an unknown token)")
