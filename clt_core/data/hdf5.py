"""Import from and export to the seed library's ("crosslayer-coding") HDF5 activation directory, so its users can
bring their data and take ours back.

The seed layout is a directory holding:
- `chunk_{i}.hdf5` (or `.h5`): datasets `layer_{l}/inputs` and `layer_{l}/targets` `[rows, d]` in float32, float16
  or uint16 (the bits of bfloat16), gzip-compressed or not, and optionally `token_ids [rows]`;
- `index.bin`, the manifest: per-chunk records `(chunk_id i4, num_tokens i4, offset i8)` or, in older versions,
  one `(chunk_id, row)` uint32 pair per row. The two are told apart by checking each against the chunk files, never
  by file size alone;
- `metadata.json` and an optional `norm_stats.json` (`{"<layer>": {"inputs"|"targets": {"mean", "std"}}}`).

Import writes the rows in manifest order and records in the store's `hdf5_source` info field what the store itself
does not hold (chunk files and their row counts, per-dataset compression and HDF5 chunking, the manifest kind and
order, the original metadata.json), so that an export reproduces the directory bit-exactly: the same dataset values,
dtypes and compression, the same index.bin bytes, equal JSON. A store without `hdf5_source`, or one derived from an
imported store (scrambled: its `parent` is no longer the HDF5 directory), is exported with one file per store chunk,
uncompressed and HDF5-chunked `(min(rows, 16384), d)` as the seed's current generator writes them (it dropped gzip:
float activations shrink by little and gzip made its reads and writes 10-20x slower), and a per-chunk index.

Work goes block by block (at most about 256 MiB of rows, aligned to the HDF5 chunks of compressed datasets so each is
decompressed once), never holding a whole chunk file or store in memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from tqdm import tqdm

from clt_core.data.norm_stats import NormStats
from clt_core.data.store import ActivationStore
from clt_core.errors import StoreError, first_line

log = logging.getLogger(__name__)

MANIFEST_DTYPE = np.dtype([("chunk_id", "<i4"), ("num_tokens", "<i4"), ("offset", "<i8")])
"""One per-chunk record of index.bin (16 bytes); `offset` is the chunk's first global row."""
PAIR_DTYPE = np.dtype("<u4")
"""The legacy index.bin: a `(chunk_id, row)` pair of these per row (8 bytes)."""
HDF5_DTYPES = {np.dtype("<u2"): "bfloat16", np.dtype("<f2"): "float16", np.dtype("<f4"): "float32"}
"""HDF5 storage dtype -> the store's logical dtype (bfloat16 travels as its uint16 bits in both formats)."""
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
SEED_HDF5_CHUNK_ROWS = 16384
"""The seed generator chunks its datasets `(min(rows, 16384), d)`; native exports do the same."""
BLOCK_BYTES = 256 * 2**20
"""Rows moved per step (inputs + targets of every layer) are capped near this many bytes."""
SOURCE_VERSION = 1
IndexKind = Literal["per_chunk", "per_row"]


# --------------------------------------------------------------------------------------------- small helpers
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing; the seed HDF5 layout needs it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path}: not readable JSON ({err})") from None


def _open_h5(path: Path) -> h5py.File:
    """Open a chunk file, turning h5py's OSError for truncated or corrupt files into a StoreError naming the file."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise StoreError(f"{path}: chunk file missing") from None
    except OSError as err:
        raise StoreError(f"{path}: not a readable HDF5 file, truncated or corrupt? ({first_line(err)})") from None


def _local_dir(path: str, role: str) -> Path:
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif "://" in path:
        raise StoreError(f"{path}: the HDF5 {role} must be a local directory, not a URL")
    return Path(path).expanduser().resolve()


def _layout(ds: h5py.Dataset) -> dict[str, Any]:
    """Everything about how a dataset is stored that an export needs to store it the same way."""
    opts = ds.compression_opts
    return {
        "chunks": list(ds.chunks) if ds.chunks else None,
        "compression": ds.compression,
        "compression_opts": list(opts) if isinstance(opts, tuple) else opts,
        "shuffle": bool(ds.shuffle),
        "fletcher32": bool(ds.fletcher32),
        "scaleoffset": ds.scaleoffset,
    }


def _create_dataset(h5: h5py.File, name: str, shape: tuple[int, ...], dtype: str, layout: dict[str, Any]) -> Any:
    opts = layout.get("compression_opts")
    return h5.create_dataset(
        name,
        shape=shape,
        dtype=np.dtype(dtype),
        chunks=tuple(layout["chunks"]) if layout.get("chunks") else None,
        compression=layout.get("compression"),
        compression_opts=tuple(opts) if isinstance(opts, list) else opts,
        shuffle=bool(layout.get("shuffle")),
        fletcher32=bool(layout.get("fletcher32")),
        scaleoffset=layout.get("scaleoffset"),
    )


def _block_rows(layout: dict[str, Any], row_bytes: int) -> int:
    """Rows per step: about BLOCK_BYTES, rounded to whole HDF5 chunks when they are compressed (a partial read or
    write of a compressed chunk would decompress, or rewrite, it once per step)."""
    target = max(1, BLOCK_BYTES // max(1, row_bytes))
    chunks = layout.get("chunks")
    filtered = layout.get("compression") or layout.get("shuffle") or layout.get("fletcher32")
    if chunks and filtered:
        return max(1, target // chunks[0]) * chunks[0]
    return target


def _blocks(start: int, stop: int, step: int) -> Iterator[tuple[int, int]]:
    """[start, stop) cut at multiples of `step`, so that steps line up with the HDF5 chunks."""
    a = start
    while a < stop:
        b = min(stop, (a // step + 1) * step)
        yield a, b
        a = b


def _normalise_dtype(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.").lower()
    return DTYPE_ALIASES.get(name, name)


# ------------------------------------------------------------------------------------------- reading the seed
@dataclass
class _ChunkFile:
    """What one chunk file holds, checked: `layer_0..L-1` with `inputs`/`targets` `[rows, d]` of one dtype."""

    chunk_id: int
    path: Path
    rows: int
    num_layers: int
    d_model: int
    dtype: np.dtype
    layouts: dict[str, dict[str, Any]]
    """Per dataset name (`layer_{l}/inputs`, ..., `token_ids`)."""
    token_dtype: np.dtype | None


def _inspect(chunk_id: int, path: Path) -> _ChunkFile:
    with _open_h5(path) as h5:
        layers = []
        for key in h5:
            if key.startswith("layer_"):
                try:
                    layers.append(int(key[len("layer_") :]))
                except ValueError:
                    raise StoreError(f"{path}: unexpected group {key!r} (expected layer_<number>)") from None
        layers.sort()
        if not layers:
            raise StoreError(f"{path}: no layer_<l> groups; not a seed activation chunk")
        if layers != list(range(len(layers))):
            raise StoreError(f"{path}: layer groups {layers} are not layer_0..layer_{len(layers) - 1}")
        first = h5.get("layer_0/inputs")
        if not isinstance(first, h5py.Dataset) or first.ndim != 2:
            raise StoreError(f"{path}: layer_0/inputs is missing or not a [rows, d] dataset")
        rows, d = first.shape
        if first.dtype not in HDF5_DTYPES:
            raise StoreError(
                f"{path}: layer_0/inputs has dtype {first.dtype}; supported are float32, float16 and uint16 "
                "(bfloat16 bits), little-endian"
            )
        layouts: dict[str, dict[str, Any]] = {}
        for layer in layers:
            for kind in ("inputs", "targets"):
                name = f"layer_{layer}/{kind}"
                ds = h5.get(name)
                if not isinstance(ds, h5py.Dataset):
                    raise StoreError(f"{path}: dataset {name} is missing")
                if ds.shape != (rows, d):
                    raise StoreError(f"{path}: {name} has shape {ds.shape}, expected {(rows, d)} like layer_0/inputs")
                if ds.dtype != first.dtype:
                    raise StoreError(f"{path}: {name} has dtype {ds.dtype}, layer_0/inputs has {first.dtype}")
                layouts[name] = _layout(ds)
        token_dtype = None
        if "token_ids" in h5:
            ds = h5["token_ids"]
            if not isinstance(ds, h5py.Dataset) or ds.shape != (rows,) or ds.dtype.kind not in "iu":
                raise StoreError(f"{path}: token_ids must be an integer dataset of shape ({rows},)")
            token_dtype = ds.dtype
            layouts["token_ids"] = _layout(ds)
        return _ChunkFile(chunk_id, path, rows, len(layers), d, first.dtype, layouts, token_dtype)


@dataclass
class _Manifest:
    kind: IndexKind
    runs: np.ndarray
    """`[R, 3]` int64 `(chunk_id, first row, row count)`: the rows in manifest order, as runs of consecutive rows."""


@dataclass
class _Candidate:
    """One reading of index.bin: the manifest if consistent, else why not and whether it got as far as the files."""

    kind: str
    manifest: _Manifest | None = None
    reason: str = ""
    reached_files: bool = False


class _ChunkDir:
    """The chunk files of a seed directory, inspected lazily and once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[int, Path] = {}
        for path in sorted(root.glob("chunk_*")):
            stem, suffix = path.stem, path.suffix
            if suffix not in (".hdf5", ".h5") or not stem[len("chunk_") :].isdigit():
                continue
            cid = int(stem[len("chunk_") :])
            if cid in self.paths:
                raise StoreError(f"{root}: both {self.paths[cid].name} and {path.name} exist; remove one")
            self.paths[cid] = path
        self._files: dict[int, _ChunkFile] = {}

    def name(self, cid: int) -> str:
        return f"chunk_{cid}.hdf5 (or .h5)"

    def get(self, cid: int) -> _ChunkFile:
        if cid not in self._files:
            if cid not in self.paths:
                raise StoreError(f"{self.root / f'chunk_{cid}.hdf5'}: chunk file referenced by index.bin is missing")
            self._files[cid] = _inspect(cid, self.paths[cid])
        return self._files[cid]


def _per_chunk_reading(raw: bytes, chunks: _ChunkDir) -> _Candidate:
    cand = _Candidate("per-chunk records")
    recs = np.frombuffer(raw, MANIFEST_DTYPE)
    ids, counts, offsets = (recs[k].astype(np.int64) for k in ("chunk_id", "num_tokens", "offset"))
    expected = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if (ids < 0).any() or len(np.unique(ids)) != len(ids):
        cand.reason = "chunk ids are negative or repeated"
    elif (counts <= 0).any():
        cand.reason = "some num_tokens are not positive"
    elif not np.array_equal(offsets, expected):
        cand.reason = "offsets are not the cumulative row counts"
    else:
        cand.reached_files = True
        for cid, count in zip(ids.tolist(), counts.tolist(), strict=True):
            if cid not in chunks.paths:
                cand.reason = f"{chunks.name(cid)} is referenced but missing"
                return cand
            rows = chunks.get(cid).rows
            if rows != count:
                cand.reason = f"{chunks.paths[cid].name} holds {rows} rows, its record says {count}"
                return cand
        runs = np.stack([ids, np.zeros_like(ids), counts], axis=1)
        cand.manifest = _Manifest("per_chunk", runs)
    return cand


def _per_row_reading(raw: bytes, chunks: _ChunkDir) -> _Candidate:
    cand = _Candidate("per-row pairs")
    pairs = np.frombuffer(raw, PAIR_DTYPE).reshape(-1, 2).astype(np.int64)
    cids, rows_in = pairs[:, 0], pairs[:, 1]
    ids = np.unique(cids)
    missing = ids[~np.isin(ids, np.fromiter(chunks.paths, np.int64, len(chunks.paths)))]
    if len(missing):
        cand.reason = f"{chunks.name(int(missing[0]))} is referenced but missing"
        return cand
    cand.reached_files = True
    sizes = np.array([chunks.get(int(c)).rows for c in ids], np.int64)
    pos = np.searchsorted(ids, cids)
    bad = np.flatnonzero(rows_in >= sizes[pos])
    if len(bad):
        i = int(bad[0])
        cand.reason = f"pair {i} names row {rows_in[i]} of {chunks.paths[int(cids[i])].name}, which has {sizes[pos[i]]}"
        return cand
    keys = np.concatenate([[0], np.cumsum(sizes)[:-1]])[pos] + rows_in
    if len(keys) != sizes.sum() or len(np.unique(keys)) != len(keys):
        cand.reason = "the pairs do not name every row of the referenced chunk files exactly once"
        return cand
    starts = np.ones(len(cids), bool)
    starts[1:] = (cids[1:] != cids[:-1]) | (rows_in[1:] != rows_in[:-1] + 1)
    first = np.flatnonzero(starts)
    counts = np.diff(np.append(first, len(cids)))
    cand.manifest = _Manifest("per_row", np.stack([cids[first], rows_in[first], counts], axis=1))
    return cand


def _read_index(path: Path, chunks: _ChunkDir) -> _Manifest:
    """Tell the two index.bin layouts apart by checking each reading against the chunk files."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path}: missing; the seed HDF5 layout needs its manifest") from None
    except OSError as err:
        raise StoreError(f"{path}: not readable ({first_line(err)})") from None
    if not raw:
        raise StoreError(f"{path}: empty; the directory holds no rows")
    if len(raw) % (2 * PAIR_DTYPE.itemsize):
        raise StoreError(
            f"{path}: {len(raw)} bytes fits neither index layout (16-byte per-chunk records or 8-byte per-row "
            "pairs); the file is truncated or not a manifest"
        )
    readings = []
    if len(raw) % MANIFEST_DTYPE.itemsize == 0:
        readings.append(_per_chunk_reading(raw, chunks))
    readings.append(_per_row_reading(raw, chunks))
    good = [r for r in readings if r.manifest is not None]
    if len(good) > 1:
        raise StoreError(f"{path}: consistent both as per-chunk records and as per-row pairs; cannot tell which")
    if good:
        assert good[0].manifest is not None
        return good[0].manifest
    reached = [r for r in readings if r.reached_files]
    if len(reached) == 1:
        raise StoreError(f"{path}: {reached[0].kind}, but {reached[0].reason}")
    reasons = "; ".join(f"as {r.kind}: {r.reason}" for r in readings)
    raise StoreError(f"{path}: matches no index layout ({reasons})")


def _check_metadata(meta_path: Path, meta: dict[str, Any], first: _ChunkFile, files: list[_ChunkFile]) -> str:
    """Cross-check the chunk files against each other and metadata.json; return the logical dtype."""
    for f in files:
        if (f.num_layers, f.d_model, f.dtype) != (first.num_layers, first.d_model, first.dtype):
            raise StoreError(
                f"{f.path}: {f.num_layers} layers x d={f.d_model} {f.dtype}, but {first.path.name} has "
                f"{first.num_layers} x d={first.d_model} {first.dtype}"
            )
    for key, found in (("num_layers", first.num_layers), ("d_model", first.d_model)):
        if key in meta and meta[key] != found:
            raise StoreError(f"{meta_path}: {key}={meta[key]!r} but the chunk files hold {found} ({first.path.name})")
    dtype = HDF5_DTYPES[first.dtype]
    declared = _normalise_dtype(meta.get("dtype"))
    if declared is not None and declared != dtype:
        raise StoreError(
            f"{meta_path}: dtype {meta['dtype']!r} but the chunk files store {first.dtype} ({dtype}); "
            "fix metadata.json or the chunk files"
        )
    return dtype


def _read_seed_norm_stats(path: Path, num_layers: int, d_model: int, count: int) -> NormStats | None:
    """norm_stats.json as float64 NormStats (keys beyond mean/std per layer are not imported). The seed computes
    std with ddof=1 where our own norm stats use ddof=0; the values are imported as they are."""
    if not path.exists():
        return None
    data = _read_json(path)
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in NormStats.ARRAYS}
    for layer in range(num_layers):
        for kind in ("inputs", "targets"):
            for stat in ("mean", "std"):
                try:
                    value = np.asarray(data[str(layer)][kind][stat], dtype=np.float64)
                except (KeyError, TypeError, ValueError):
                    raise StoreError(f"{path}: no numeric list for layer {layer} {kind} {stat}") from None
                if value.shape != (d_model,):
                    raise StoreError(f"{path}: layer {layer} {kind} {stat} has shape {value.shape}, need ({d_model},)")
                arrays[f"{kind}_{stat}"].append(value)
    return NormStats(count=count, **{k: np.stack(v) for k, v in arrays.items()})


def _dedupe(layouts: list[dict[str, Any]], layout: dict[str, Any]) -> int:
    if layout not in layouts:
        layouts.append(layout)
    return layouts.index(layout)


def _source_record(src: Path, manifest: _Manifest, files: list[_ChunkFile], meta: dict[str, Any]) -> dict[str, Any]:
    """The `hdf5_source` info field: what an export needs to write the directory again exactly."""
    layouts: list[dict[str, Any]] = []
    entries = []
    for f in files:
        per_ds = {name: _dedupe(layouts, lay) for name, lay in f.layouts.items() if name != "token_ids"}
        uniform = len(set(per_ds.values())) == 1
        tokens = None
        if f.token_dtype is not None:
            tokens = {"dtype": f.token_dtype.str, "layout": _dedupe(layouts, f.layouts["token_ids"])}
        entries.append(
            {
                "name": f.path.name,
                "chunk_id": f.chunk_id,
                "rows": f.rows,
                "layout": next(iter(per_ds.values())) if uniform else per_ds,
                "token_ids": tokens,
            }
        )
    return {
        "version": SOURCE_VERSION,
        "source": str(src),
        "index_kind": manifest.kind,
        "dtype": files[0].dtype.str,
        "files": entries,
        "layouts": layouts,
        "runs": manifest.runs.tolist(),
        "metadata": meta,
    }


class _OpenFiles:
    """A few chunk files kept open, so manifests that alternate between files do not reopen them per run."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.files: OrderedDict[Path, h5py.File] = OrderedDict()

    def get(self, path: Path) -> h5py.File:
        if path in self.files:
            self.files.move_to_end(path)
            return self.files[path]
        if len(self.files) >= self.size:
            self.files.popitem(last=False)[1].close()
        self.files[path] = _open_h5(path)
        return self.files[path]

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()


def import_hdf5(
    src_dir: str,
    dst_url: str,
    *,
    overwrite: bool = False,
    rows_per_chunk: int | None = None,
    progress: bool = True,
) -> ActivationStore:
    """Import a seed HDF5 activation directory into a new store at `dst_url`, rows in manifest order.

    Everything is checked before the store is created, so bad input leaves nothing behind; a read error in the
    middle of the data (a corrupt compressed chunk) leaves a partial store to be replaced with `overwrite`.
    """
    src = _local_dir(src_dir, "source")
    if not src.is_dir():
        raise StoreError(f"{src}: not a directory; give the seed activation directory (index.bin, metadata.json)")
    meta_path = src / "metadata.json"
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise StoreError(f"{meta_path}: expected a JSON object")
    chunks = _ChunkDir(src)
    manifest = _read_index(src / "index.bin", chunks)
    order = list(dict.fromkeys(int(c) for c in manifest.runs[:, 0]))
    files = [chunks.get(cid) for cid in order]
    first = files[0]
    dtype = _check_metadata(meta_path, meta, first, files)
    num_layers, d_model = first.num_layers, first.d_model
    total = int(manifest.runs[:, 2].sum())
    norm = _read_seed_norm_stats(src / "norm_stats.json", num_layers, d_model, total)

    info: dict[str, Any] = {"parent": str(src)}
    if meta.get("model_name"):
        info["model"] = {"name": str(meta["model_name"])}
    if meta.get("dataset") is not None:
        info["text_dataset"] = str(meta["dataset"])
    if meta.get("split") is not None:
        info["text_split"] = str(meta["split"])
    if isinstance(meta.get("context_size"), int):
        info["context_size"] = meta["context_size"]
    store = ActivationStore.create(
        dst_url,
        num_layers=num_layers,
        d_model=d_model,
        dtype=dtype,  # type: ignore[arg-type]
        rows_per_chunk=rows_per_chunk,
        overwrite=overwrite,
        **info,
    )
    by_id = {f.chunk_id: f for f in files}
    row_bytes = 2 * num_layers * d_model * first.dtype.itemsize
    open_files = _OpenFiles()
    bar = tqdm(total=total, unit="row", unit_scale=True, desc="import hdf5", disable=not progress)
    try:
        with store.writer() as writer:
            for cid, start, count in manifest.runs.tolist():
                f = by_id[cid]
                h5 = open_files.get(f.path)
                step = _block_rows(f.layouts["layer_0/inputs"], row_bytes)
                for a, b in _blocks(start, start + count, step):
                    inputs, targets, ids = _read_rows(f, h5, a, b)
                    # Hand the writer store-chunk-sized views: it then never copies more than one chunk at once.
                    for i in range(0, b - a, store.rows_per_chunk):
                        j = i + store.rows_per_chunk
                        writer.append(inputs[i:j], targets[i:j], ids[i:j])
                    del inputs, targets
                    bar.update(b - a)
    finally:
        bar.close()
        open_files.close()
    store.update_info(hdf5_source=_source_record(src, manifest, files, meta))
    if norm is not None:
        store.write_norm_stats(norm)
    return store


def _read_rows(f: _ChunkFile, h5: h5py.File, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [a, b) of one chunk file as `[n, L, d]` storage arrays and int32 token ids (-1 where absent)."""
    inputs = np.empty((b - a, f.num_layers, f.d_model), f.dtype)
    targets = np.empty_like(inputs)
    try:
        for layer in range(f.num_layers):  # one layer at a time into the block (HDF5's own strided reads are 4x slower)
            inputs[:, layer] = h5[f"layer_{layer}/inputs"][a:b]
            targets[:, layer] = h5[f"layer_{layer}/targets"][a:b]
        if f.token_dtype is None:
            return inputs, targets, np.full(b - a, -1, np.int32)
        ids = np.asarray(h5["token_ids"][a:b])
    except OSError as err:
        raise StoreError(f"{f.path}: cannot read rows {a}..{b}, corrupt? ({first_line(err)})") from None
    if len(ids) and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        raise StoreError(f"{f.path}: token_ids outside the int32 range the store keeps")
    return inputs, targets, ids.astype(np.int32)


# ------------------------------------------------------------------------------------------------- exporting
@dataclass
class _Plan:
    """The directory an export writes: chunk files (name, chunk id, rows, layouts), the manifest and the JSON."""

    index_kind: IndexKind
    dtype: str
    files: list[dict[str, Any]]
    layouts: list[dict[str, Any]]
    runs: list[list[int]]
    metadata: dict[str, Any]


def _plan_from_source(store: ActivationStore, source: Any) -> _Plan | None:
    """The plan recorded at import, if it still describes this store; None for a store derived from it."""
    if not isinstance(source, dict):
        return None
    if source.get("source") != store.info.parent:
        log.info("%s: derived from an imported store; exporting its own chunks", store.url)
        return None
    try:
        plan = _Plan(
            index_kind=source["index_kind"],
            dtype=source["dtype"],
            files=list(source["files"]),
            layouts=list(source["layouts"]),
            runs=[[int(x) for x in run] for run in source["runs"]],
            metadata=dict(source["metadata"]),
        )
        rows = {int(f["chunk_id"]): int(f["rows"]) for f in plan.files}
        covered = dict.fromkeys(rows, 0)
        for cid, start, count in plan.runs:
            covered[cid] += count
            if start < 0 or start + count > rows[cid]:
                raise ValueError("run outside its file")
        valid_kind = plan.index_kind in ("per_chunk", "per_row")
    except (KeyError, TypeError, ValueError) as err:
        raise StoreError(f"{store.url}: the hdf5_source metadata is damaged ({err!r}); cannot export it") from None
    if not valid_kind or covered != rows or np.dtype(plan.dtype) not in HDF5_DTYPES:
        raise StoreError(f"{store.url}: the hdf5_source metadata is inconsistent; cannot export it")
    if sum(rows.values()) != store.num_rows or HDF5_DTYPES[np.dtype(plan.dtype)] != store.dtype:
        log.warning("%s: rows or dtype changed since the HDF5 import; exporting the store's own chunks", store.url)
        return None
    return plan


def _native_plan(store: ActivationStore) -> _Plan:
    """One uncompressed file per store chunk, a per-chunk index, metadata.json from the store's info."""
    known_ids = any(bool((store.token_ids[a:b] != -1).any()) for a, b in _blocks(0, store.num_rows, 1 << 22) if b > a)
    layouts: list[dict[str, Any]] = []
    files, runs = [], []
    for i in range(store.num_chunks):
        start, stop = store.chunk_rows(i)
        rows = stop - start
        base = {"compression": None, "compression_opts": None, "shuffle": False, "fletcher32": False}
        layout = _dedupe(layouts, {**base, "chunks": [min(rows, SEED_HDF5_CHUNK_ROWS), store.d_model]})
        tokens = None
        if known_ids:
            tokens = {"dtype": "<i4", "layout": _dedupe(layouts, {**base, "chunks": None})}
        files.append({"name": f"chunk_{i}.hdf5", "chunk_id": i, "rows": rows, "layout": layout, "token_ids": tokens})
        runs.append([i, 0, rows])
    info = store.info
    metadata = {
        "model_name": info.model.get("name"),
        "dataset": info.text_dataset,
        "split": getattr(info, "text_split", None),
        "num_layers": store.num_layers,
        "d_model": store.d_model,
        "dtype": store.dtype,
        "total_tokens": store.num_rows,
        "chunk_tokens": store.rows_per_chunk,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    storage_dtype = {v: k for k, v in HDF5_DTYPES.items()}[store.dtype].str
    return _Plan("per_chunk", storage_dtype, files, layouts, runs, metadata)


def _prepare_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise StoreError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise StoreError(f"{dst}: already exists and is not empty; pass --overwrite to replace it")
        # Remove only what this layout consists of: a mistyped path must not cost the user other files.
        for path in dst.iterdir():
            is_chunk = path.name.startswith("chunk_") and path.suffix in (".hdf5", ".h5")
            if path.is_file() and (is_chunk or path.name in ("index.bin", "metadata.json", "norm_stats.json")):
                path.unlink()
    dst.mkdir(parents=True, exist_ok=True)


def _write_index(path: Path, plan: _Plan) -> None:
    rows = {int(f["chunk_id"]): int(f["rows"]) for f in plan.files}
    with path.open("wb") as out:
        if plan.index_kind == "per_chunk":
            recs = np.zeros(len(plan.runs), MANIFEST_DTYPE)
            offset = 0
            for i, (cid, _start, count) in enumerate(plan.runs):
                recs[i] = (cid, rows[cid], offset)
                offset += count
            recs.tofile(out)
        else:
            for cid, start, count in plan.runs:
                pairs = np.empty((count, 2), PAIR_DTYPE)
                pairs[:, 0] = cid
                pairs[:, 1] = np.arange(start, start + count)
                pairs.tofile(out)


def _norm_stats_json(stats: NormStats) -> dict[str, Any]:
    return {
        str(layer): {
            kind: {
                "mean": [float(x) for x in getattr(stats, f"{kind}_mean")[layer]],
                "std": [float(x) for x in getattr(stats, f"{kind}_std")[layer]],
            }
            for kind in ("inputs", "targets")
        }
        for layer in range(stats.inputs_mean.shape[0])
    }


def _write_file(
    store: ActivationStore,
    path: Path,
    entry: dict[str, Any],
    plan: _Plan,
    runs: list[tuple[int, int, int]],
    advance: Callable[[int], None],
) -> None:
    """One chunk file; `runs` are `(store row, file row, count)` of the rows it holds."""
    rows, layer_layout = int(entry["rows"]), entry["layout"]
    L, d = store.num_layers, store.d_model
    with h5py.File(path, "w", libver="latest") as h5:
        datasets: dict[str, Any] = {}
        for layer in range(L):
            for kind in ("inputs", "targets"):
                name = f"layer_{layer}/{kind}"
                idx = layer_layout if isinstance(layer_layout, int) else layer_layout[name]
                datasets[name] = _create_dataset(h5, name, (rows, d), plan.dtype, plan.layouts[idx])
        tokens = entry.get("token_ids")
        token_ds = None
        if tokens:
            token_ds = _create_dataset(h5, "token_ids", (rows,), tokens["dtype"], plan.layouts[tokens["layout"]])
        first = layer_layout if isinstance(layer_layout, int) else layer_layout["layer_0/inputs"]
        step = _block_rows(plan.layouts[first], 2 * L * d * np.dtype(plan.dtype).itemsize)
        for store_row, file_row, count in runs:
            for a, b in _blocks(file_row, file_row + count, step):
                s = store_row + a - file_row
                inputs, targets, ids = store.read_storage(s, s + b - a)
                for layer in range(L):
                    datasets[f"layer_{layer}/inputs"][a:b] = np.ascontiguousarray(inputs[:, layer])
                    datasets[f"layer_{layer}/targets"][a:b] = np.ascontiguousarray(targets[:, layer])
                if token_ds is not None:
                    token_ds[a:b] = ids.astype(token_ds.dtype)
                advance(b - a)


def export_hdf5(src_url: str, dst_dir: str, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a store as a seed HDF5 directory: exactly the imported one if the store came from `import_hdf5`.

    norm_stats.json is written from the store's current norm stats (if any), so stats computed after an import are
    exported too. With `overwrite`, only the files of this layout are removed from an existing directory.
    """
    store = ActivationStore.open(src_url)
    dst = _local_dir(dst_dir, "destination")
    if store.num_rows == 0:
        raise StoreError(f"{store.url}: the store has no committed rows; nothing to export")
    plan = _plan_from_source(store, getattr(store.info, "hdf5_source", None)) or _native_plan(store)
    _prepare_destination(dst, overwrite)

    per_file: dict[int, list[tuple[int, int, int]]] = {int(f["chunk_id"]): [] for f in plan.files}
    store_row = 0
    for cid, start, count in plan.runs:
        per_file[cid].append((store_row, start, count))
        store_row += count
    bar = tqdm(total=store.num_rows, unit="row", unit_scale=True, desc="export hdf5", disable=not progress)
    try:
        for entry in plan.files:
            path = dst / entry["name"]
            try:
                _write_file(store, path, entry, plan, per_file[int(entry["chunk_id"])], bar.update)
            except OSError as err:
                raise StoreError(f"{path}: cannot write ({first_line(err)})") from None
    finally:
        bar.close()
    _write_index(dst / "index.bin", plan)
    (dst / "metadata.json").write_text(json.dumps(plan.metadata, indent=2))
    stats = store.read_norm_stats()
    if stats is not None:
        (dst / "norm_stats.json").write_text(json.dumps(_norm_stats_json(stats)))
    return dst
