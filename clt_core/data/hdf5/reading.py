"""Import: the seed's chunk files and manifest (either kind) into a store, recording in `hdf5_source` what an
export needs to reproduce the directory."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from clt_core.data.hdf5.layout import (
    HDF5_DTYPES,
    MANIFEST_DTYPE,
    PAIR_DTYPE,
    SOURCE_VERSION,
    IndexKind,
    block_rows,
    blocks,
    dataset_layout,
    dedupe_layout,
    local_dir,
    normalise_dtype,
    open_h5,
    read_json,
)
from clt_core.data.norm_stats import NormStats
from clt_core.data.store import ActivationStore
from clt_core.errors import StoreError, first_line

log = logging.getLogger(__name__)


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
    with open_h5(path) as h5:
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
                layouts[name] = dataset_layout(ds)
        token_dtype = None
        if "token_ids" in h5:
            ds = h5["token_ids"]
            if not isinstance(ds, h5py.Dataset) or ds.shape != (rows,) or ds.dtype.kind not in "iu":
                raise StoreError(f"{path}: token_ids must be an integer dataset of shape ({rows},)")
            token_dtype = ds.dtype
            layouts["token_ids"] = dataset_layout(ds)
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
    declared = normalise_dtype(meta.get("dtype"))
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
    data = read_json(path)
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


def _source_record(src: Path, manifest: _Manifest, files: list[_ChunkFile], meta: dict[str, Any]) -> dict[str, Any]:
    """The `hdf5_source` info field: what an export needs to write the directory again exactly."""
    layouts: list[dict[str, Any]] = []
    entries = []
    for f in files:
        per_ds = {name: dedupe_layout(layouts, lay) for name, lay in f.layouts.items() if name != "token_ids"}
        uniform = len(set(per_ds.values())) == 1
        tokens = None
        if f.token_dtype is not None:
            tokens = {"dtype": f.token_dtype.str, "layout": dedupe_layout(layouts, f.layouts["token_ids"])}
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
        self.files[path] = open_h5(path)
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
    src = local_dir(src_dir, "source")
    if not src.is_dir():
        raise StoreError(f"{src}: not a directory; give the seed activation directory (index.bin, metadata.json)")
    meta_path = src / "metadata.json"
    meta = read_json(meta_path)
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
                step = block_rows(f.layouts["layer_0/inputs"], row_bytes)
                for a, b in blocks(start, start + count, step):
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
