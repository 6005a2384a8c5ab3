"""The seed HDF5 layout's constants and the small helpers that reading and writing it share."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from clt_core.errors import StoreError, first_line

log = logging.getLogger(__name__)

MANIFEST_DTYPE = np.dtype([("chunk_id", "<i4"), ("num_tokens", "<i4"), ("offset", "<i8")])
"""One per-chunk record of index.bin (16 bytes); `offset` is the chunk's first global row."""
PAIR_DTYPE = np.dtype("<u4")
"""The legacy index.bin: a `(chunk_id, row)` pair of these per row (8 bytes)."""
HDF5_DTYPES: dict[np.dtype, str] = {np.dtype("<u2"): "bfloat16", np.dtype("<f2"): "float16", np.dtype("<f4"): "float32"}
"""HDF5 storage dtype -> the store's logical dtype (bfloat16 travels as its uint16 bits in both formats)."""
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
SEED_HDF5_CHUNK_ROWS = 16384
"""The seed generator chunks its datasets `(min(rows, 16384), d)`; native exports do the same."""
BLOCK_BYTES = 256 * 2**20
"""Rows moved per step (inputs + targets of every layer) are capped near this many bytes."""
SOURCE_VERSION = 1
IndexKind = Literal["per_chunk", "per_row"]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing; the seed HDF5 layout needs it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path}: not readable JSON ({err})") from None


def open_h5(path: Path) -> h5py.File:
    """Open a chunk file, turning h5py's OSError for truncated or corrupt files into a StoreError naming the file."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise StoreError(f"{path}: chunk file missing") from None
    except OSError as err:
        raise StoreError(f"{path}: not a readable HDF5 file, truncated or corrupt? ({first_line(err)})") from None


def local_dir(path: str, role: str) -> Path:
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif "://" in path:
        raise StoreError(f"{path}: the HDF5 {role} must be a local directory, not a URL")
    return Path(path).expanduser().resolve()


def dataset_layout(ds: h5py.Dataset) -> dict[str, Any]:
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


def create_dataset(h5: h5py.File, name: str, shape: tuple[int, ...], dtype: str, layout: dict[str, Any]) -> Any:
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


def block_rows(layout: dict[str, Any], row_bytes: int) -> int:
    """Rows per step: about BLOCK_BYTES, rounded to whole HDF5 chunks when they are compressed (a partial read or
    write of a compressed chunk would decompress, or rewrite, it once per step)."""
    target = max(1, BLOCK_BYTES // max(1, row_bytes))
    chunks = layout.get("chunks")
    filtered = layout.get("compression") or layout.get("shuffle") or layout.get("fletcher32")
    if chunks and filtered:
        return max(1, target // chunks[0]) * chunks[0]
    return target


def blocks(start: int, stop: int, step: int) -> Iterator[tuple[int, int]]:
    """[start, stop) cut at multiples of `step`, so that steps line up with the HDF5 chunks."""
    a = start
    while a < stop:
        b = min(stop, (a // step + 1) * step)
        yield a, b
        a = b


def normalise_dtype(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.").lower()
    return DTYPE_ALIASES.get(name, name)


def dedupe_layout(layouts: list[dict[str, Any]], layout: dict[str, Any]) -> int:
    """The index of `layout` in `layouts`, appended if new (files share layout records by index)."""
    if layout not in layouts:
        layouts.append(layout)
    return layouts.index(layout)
