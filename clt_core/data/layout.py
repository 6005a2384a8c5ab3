"""What an activation store holds (format_version 1; docs/formats.md): its constants, the metadata model
`StoreInfo`, the row type `ActivationRows`, the storage dtypes (bfloat16 as its uint16 bits) and chunk sizing, and
typed access to its Zarr nodes (a node of the wrong kind or an attribute of the wrong type is a damaged store)."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import torch
import zarr
from pydantic import BaseModel, ConfigDict
from zarr.errors import ContainsGroupError

from clt_core.errors import StoreError

FORMAT_VERSION = 1
INFO_KEY = "clt_dataset"
ARRAYS = ("inputs", "targets")
DType = Literal["bfloat16", "float16", "float32"]

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

    format_version: int = FORMAT_VERSION
    num_layers: int
    d_model: int
    dtype: DType
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


class ActivationRows(NamedTuple):
    """A block of token rows, in the store's logical dtype."""

    inputs: torch.Tensor
    """MLP inputs `[n, L, d]`."""
    targets: torch.Tensor
    """MLP outputs `[n, L, d]`."""
    token_ids: torch.Tensor
    """Token id of each row `[n]` int32 (-1 where unknown)."""


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
    """A power of two such that one chunk of one array is about 4 MiB."""
    row_bytes = num_layers * d_model * DTYPES[dtype][0].itemsize
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
