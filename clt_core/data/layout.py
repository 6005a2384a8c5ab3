"""What an activation store holds (format_version 1, and 2 for quantised stores; docs/formats.md): its constants,
the metadata model `StoreInfo`, the row types `ActivationRows` and `RawRows`, the storage dtypes (bfloat16 as its
uint16 bits; int8 and fp8 quantised, data/quantize.py) and chunk sizing, and typed access to its Zarr nodes (a node
of the wrong kind or an attribute of the wrong type is a damaged store)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, cast, get_args

import numpy as np
import torch
import zarr
from pydantic import BaseModel, ConfigDict
from zarr.errors import ContainsGroupError

from clt_core.errors import StoreError

FORMAT_VERSION = 2
"""The newest format this version reads and writes: 2 for quantised stores, which older readers must refuse; stores
without quantisation are still written as `PLAIN_FORMAT_VERSION` (1), which every version reads."""
PLAIN_FORMAT_VERSION = 1
READABLE_VERSIONS = (1, 2)
INFO_KEY = "clt_dataset"
ARRAYS = ("inputs", "targets")
SCALE_ARRAYS = ("inputs_scale", "targets_scale")
"""Quantised stores only: the per-row, per-layer float32 scale `[N, L]` of `inputs` and `targets`."""
REFERENCE_ARRAY = "quantization_reference"
"""Quantised stores only: float32 `[4, L, d]`, the centre and spread of inputs and targets (data/quantize.py)."""
DType = Literal["bfloat16", "float16", "float32"]
"""The logical dtype: what reads return."""
Quantization = Literal["none", "int8", "fp8"]
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)
StorageDType = Literal["bfloat16", "float16", "float32", "int8", "fp8"]
"""How values are stored: a logical dtype as it is, or quantised (int8, fp8 e4m3fn) with bfloat16 as logical dtype."""
STORAGE_DTYPES: tuple[StorageDType, ...] = get_args(StorageDType)
QUANTIZED_NP: dict[str, np.dtype] = {"int8": np.dtype(np.int8), "fp8": np.dtype(np.uint8)}
"""Quantisation -> numpy storage dtype of `inputs`/`targets` (fp8 e4m3fn as its uint8 bits)."""

# logical dtype -> (numpy storage dtype, torch dtype)
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
    "float16": (np.dtype(np.float16), torch.float16),
    "float32": (np.dtype(np.float32), torch.float32),
}
DEFAULT_CHUNK_BYTES = 4 * 2**20


class StoreInfo(BaseModel):
    """The `clt_dataset` group attribute: what the store holds and where it came from."""

    model_config = ConfigDict(extra="allow")

    format_version: int = PLAIN_FORMAT_VERSION
    num_layers: int
    d_model: int
    dtype: DType
    quantization: Quantization = "none"
    """`int8` or `fp8`: values stored quantised (format_version 2, logical dtype bfloat16); `none` for stores written
    before the setting, too."""
    model: dict[str, Any] = {}
    """Source model: name, revision or weights file hash."""
    context_size: int | None = None
    hook_templates: dict[str, str] = {}
    """MLP input and output module templates used for capture."""
    text_dataset: str | None = None
    seed: int | None = None
    rows_committed: int = 0
    scrambled: bool = False
    parent: str | None = None
    """URL of the store this one was derived from (scramble, import)."""
    created_at: str = ""


def split_storage_dtype(storage_dtype: str) -> tuple[DType, Quantization]:
    """(logical dtype, quantisation) of a storage dtype; a one-line StoreError for one this version does not know."""
    if storage_dtype not in STORAGE_DTYPES:
        raise StoreError(f"unknown storage dtype {storage_dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    if storage_dtype in QUANTIZED_NP:
        return "bfloat16", cast(Quantization, storage_dtype)
    return cast(DType, storage_dtype), "none"


def storage_dtype_of(dtype: str, quantization: str) -> StorageDType:
    """Inverse of `split_storage_dtype`."""
    return cast(StorageDType, dtype if quantization == "none" else quantization)


def stored_np(dtype: str, quantization: str = "none") -> np.dtype:
    """The numpy dtype `inputs`/`targets` are stored as."""
    return QUANTIZED_NP[quantization] if quantization != "none" else DTYPES[dtype][0]


class ActivationRows(NamedTuple):
    """A block of token rows, in the store's logical dtype."""

    inputs: torch.Tensor
    """MLP inputs `[n, L, d]`."""
    targets: torch.Tensor
    """MLP outputs `[n, L, d]`."""
    token_ids: torch.Tensor
    """Token id of each row `[n]` int32 (-1 where unknown)."""


class RawRows(NamedTuple):
    """A block of token rows as stored: `inputs`/`targets` in the storage dtype (bf16 as uint16 bits, quantised codes
    as int8/uint8) and, for quantised stores, their float32 scales `[n, L]` (None otherwise)."""

    inputs: np.ndarray
    targets: np.ndarray
    token_ids: np.ndarray
    inputs_scale: np.ndarray | None = None
    targets_scale: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> RawRows:
        """`fn` applied to each array (the scales of an unquantised block stay None)."""
        x, y, ids, xs, ys = self
        return RawRows(fn(x), fn(y), fn(ids), None if xs is None else fn(xs), None if ys is None else fn(ys))

    def rows(self, lo: int, hi: int) -> RawRows:
        """Rows [lo, hi) (views)."""
        return self.map(lambda a: a[lo:hi])

    def copy(self) -> RawRows:
        return self.map(np.copy)

    @staticmethod
    def concat(parts: list[RawRows]) -> RawRows:
        """One block of several (the only one as it is: concatenating would copy it)."""
        if len(parts) == 1:
            return parts[0]
        x, y, ids, xs, ys = (list(col) for col in zip(*parts, strict=True))
        scales = [None if col[0] is None else np.concatenate(col) for col in (xs, ys)]
        return RawRows(np.concatenate(x), np.concatenate(y), np.concatenate(ids), *scales)


def to_storage(x: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Convert rows to the numpy array that is written (bf16 -> its uint16 bits; bit-exact)."""
    storage_np, torch_dtype = DTYPES[dtype]
    if isinstance(x, np.ndarray):
        if x.dtype == storage_np:
            return x
        x = torch.from_numpy(x)
    x = x.detach().to("cpu", torch_dtype).contiguous()
    if dtype == "bfloat16":
        x = x.view(torch.uint16)
    return x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `to_storage`: a torch tensor in the logical dtype (zero-copy)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def default_rows_per_chunk(num_layers: int, d_model: int, dtype: str) -> int:
    """A power of two such that one chunk of one array is about 4 MiB (`dtype` a storage dtype: int8 and fp8 rows
    are one byte a value)."""
    row_bytes = num_layers * d_model * (QUANTIZED_NP[dtype] if dtype in QUANTIZED_NP else DTYPES[dtype][0]).itemsize
    rows = 2 ** round(math.log2(max(1, DEFAULT_CHUNK_BYTES / row_bytes)))
    return int(min(max(rows, 16), 65536))


def require_group(parent: zarr.Group, name: str) -> zarr.Group:
    """`parent.require_group(name)` that tolerates another process creating the group at the same moment (the
    shards of a parallel write do), which Zarr reports as ContainsGroupError."""
    try:
        return parent.require_group(name)
    except ContainsGroupError:  # what is there now is that group
        return cast(zarr.Group, parent[name])


def child_group(parent: zarr.Group, name: str, url: str) -> zarr.Group:
    """`parent[name]`, which must be a group: KeyError when it is absent, StoreError when it is an array."""
    node = parent[name]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{url}: '{_member(parent, name)}' is an array where a group belongs; the store is damaged")
    return node


def child_array(parent: zarr.Group, name: str, url: str) -> zarr.Array:
    """`parent[name]`, which must be an array: KeyError when it is absent, StoreError when it is a group."""
    node = parent[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{url}: '{_member(parent, name)}' is a group where an array belongs; the store is damaged")
    return node


def int_attr(node: zarr.Group, key: str, url: str, default: int | None = None) -> int:
    """The integer attribute `key` of `node`; StoreError when it is absent (and no default) or not an integer."""
    value = node.attrs.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        where = node.path or "/"
        raise StoreError(f"{url}: attribute '{key}' of '{where}' is {value!r}, not an integer; the store is damaged")
    return value


def _member(parent: zarr.Group, name: str) -> str:
    return f"{parent.path}/{name}" if parent.path else name
