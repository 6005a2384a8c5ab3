"""Export: a store back into the seed layout, bit-exactly for an imported store, else one file per store chunk."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
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
    SEED_HDF5_CHUNK_ROWS,
    IndexKind,
    block_rows,
    blocks,
    create_dataset,
    dedupe_layout,
    local_dir,
)
from clt_core.data.layout import to_storage
from clt_core.data.norm_stats import NormStats
from clt_core.data.store import ActivationStore
from clt_core.errors import StoreError, first_line

log = logging.getLogger(__name__)


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
    known_ids = any(
        bool((np.asarray(store.token_ids[a:b]) != -1).any()) for a, b in blocks(0, store.num_rows, 1 << 22) if b > a
    )
    layouts: list[dict[str, Any]] = []
    files, runs = [], []
    for i in range(store.num_chunks):
        start, stop = store.chunk_rows(i)
        rows = stop - start
        base = {"compression": None, "compression_opts": None, "shuffle": False, "fletcher32": False}
        layout = dedupe_layout(layouts, {**base, "chunks": [min(rows, SEED_HDF5_CHUNK_ROWS), store.d_model]})
        tokens = None
        if known_ids:
            tokens = {"dtype": "<i4", "layout": dedupe_layout(layouts, {**base, "chunks": None})}
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
                datasets[name] = create_dataset(h5, name, (rows, d), plan.dtype, plan.layouts[idx])
        tokens = entry.get("token_ids")
        token_ds = None
        if tokens:
            token_ds = create_dataset(h5, "token_ids", (rows,), tokens["dtype"], plan.layouts[tokens["layout"]])
        first = layer_layout if isinstance(layer_layout, int) else layer_layout["layer_0/inputs"]
        step = block_rows(plan.layouts[first], 2 * L * d * np.dtype(plan.dtype).itemsize)
        for store_row, file_row, count in runs:
            for a, b in blocks(file_row, file_row + count, step):
                s = store_row + a - file_row
                inputs, targets, ids = _stored_values(store, s, s + b - a)
                for layer in range(L):
                    datasets[f"layer_{layer}/inputs"][a:b] = np.ascontiguousarray(inputs[:, layer])
                    datasets[f"layer_{layer}/targets"][a:b] = np.ascontiguousarray(targets[:, layer])
                if token_ds is not None:
                    token_ds[a:b] = ids.astype(token_ds.dtype)
                advance(b - a)


def _stored_values(store: ActivationStore, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [start, stop) in the logical dtype's storage form (bf16 as uint16 bits): as stored, or dequantised."""
    if not store.quantized:
        return store.read_storage(start, stop)
    rows = store.read(start, stop)
    return to_storage(rows.inputs, store.dtype), to_storage(rows.targets, store.dtype), rows.token_ids.numpy()


def export_hdf5(src_url: str, dst_dir: str, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a store as a seed HDF5 directory: exactly the imported one if the store came from `import_hdf5`. A
    quantised store's values are written dequantised, in bfloat16 (the seed layout has no quantised form).

    norm_stats.json is written from the store's current norm stats (if any), so stats computed after an import are
    exported too. With `overwrite`, only the files of this layout are removed from an existing directory.
    """
    store = ActivationStore.open(src_url)
    dst = local_dir(dst_dir, "destination")
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
