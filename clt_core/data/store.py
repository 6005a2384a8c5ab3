"""The activation store: a Zarr v3 group holding MLP inputs and targets per token row (format_version 1; 2 when
quantised).

Layout (docs/formats.md; its constants and types in data/layout.py, its codecs in data/codecs.py): arrays `inputs`
and `targets` `[N, L, d]` chunked `(rows_per_chunk, L, d)`, `token_ids [N]`, the group attribute `clt_dataset` (a
`StoreInfo`), and an optional `norm_stats` subgroup of float64 `[L, d]` arrays. bfloat16 is stored as its uint16 bit
pattern with the array attribute `logical_dtype: "bfloat16"`. A quantised store (`quantization` int8 or fp8,
data/quantize.py) holds one-byte codes in `inputs`/`targets`, their float32 scales `inputs_scale`/`targets_scale`
`[N, L]` chunked like the rows, and its reference `quantization_reference`; `read` returns the dequantised bfloat16
values, `read_raw` what is stored.

Commit protocol: rows become visible only when `rows_committed` in `clt_dataset` is advanced, which happens after
the chunk objects holding them were written (local writes are atomic renames, S3 PUTs are atomic). A writer that
dies leaves at most unreferenced chunk data past `rows_committed`; the next writer overwrites it.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
import zarr
from pydantic import ValidationError
from zarr.errors import ContainsArrayError, ContainsGroupError

from clt_core.data.codecs import DEFAULT_CODEC, Codec, check_codec, codec_compressors, codec_name
from clt_core.data.layout import (
    ARRAYS,
    DTYPES,
    FORMAT_VERSION,
    INFO_KEY,
    PLAIN_FORMAT_VERSION,
    QUANTIZATIONS,
    READABLE_VERSIONS,
    REFERENCE_ARRAY,
    SCALE_ARRAYS,
    ActivationRows,
    DType,
    Quantization,
    RawRows,
    StorageDType,
    StoreInfo,
    child_array,
    child_group,
    default_rows_per_chunk,
    from_storage,
    int_attr,
    require_group,
    storage_dtype_of,
    stored_np,
    to_storage,
)
from clt_core.data.norm_stats import NormStats
from clt_core.data.quantize import REFERENCE_ORDER, QuantReference, dequantize, digest, quantize
from clt_core.data.storage import StoreLocation, parse_url, storage_errors, zarr_store
from clt_core.errors import StoreError

# Two pools, so no task ever waits on a task queued behind it in its own pool: `_io_pool` runs only leaf reads and
# writes of one array slice (which never wait on anything), `_prefetch_pool` runs whole-chunk reads for
# `iter_chunks`, which wait on `_io_pool`. With one shared pool, 16 concurrent prefetches filled every thread while
# waiting for their own slice reads, and e.g. `compute_norm_stats(workers=8)` deadlocked.
_io_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="clt-store-io")
_prefetch_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="clt-store-prefetch")


class ActivationStore:
    """An open activation store. Create with `ActivationStore.create`, open with `ActivationStore.open`."""

    def __init__(self, loc: StoreLocation, group: zarr.Group, read_only: bool) -> None:
        self.loc = loc
        self.group = group
        self.read_only = read_only
        self.info = self._load_info()
        self.inputs = self._array("inputs")
        self.targets = self._array("targets")
        self.token_ids = self._array("token_ids")
        self.inputs_scale: zarr.Array | None = None
        self.targets_scale: zarr.Array | None = None
        if self.quantized:
            self.inputs_scale, self.targets_scale = (self._array(name) for name in SCALE_ARRAYS)
        self._reference: QuantReference | None = None
        self._check_layout()

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(
        cls,
        url: str,
        *,
        num_layers: int,
        d_model: int,
        dtype: DType = "bfloat16",
        quantization: Quantization = "none",
        reference: QuantReference | None = None,
        rows_per_chunk: int | None = None,
        compression: Codec = DEFAULT_CODEC,
        overwrite: bool = False,
        reserve_rows: int = 0,
        exist_ok: bool = False,
        **info: Any,
    ) -> ActivationStore:
        """Create an empty store. Refuses an existing store unless `overwrite`. `compression` is the codec of its
        arrays (`codecs.CODECS`). `reserve_rows` sizes the arrays up front, for writers that fill row ranges in
        parallel (they must not resize the arrays concurrently). `quantization` int8 or fp8 stores the (bfloat16)
        values quantised; their `reference` is written now if given (and the store has none), else later, before
        the first row, with `quantize.ensure_reference`.

        `exist_ok`: return the store at `url` if there is one instead of refusing it, completing it if its creation
        was cut short (a killed process) or is under way elsewhere (shards of a parallel extraction create their
        store at the same moment). Nothing is ever deleted: each metadata object is written whole, at most once per
        process, and the group's is written first with the store's metadata, so any store ours to complete is
        recognisably an activation store."""
        if exist_ok and overwrite:
            raise StoreError("exist_ok and overwrite contradict each other")
        if dtype not in DTYPES:
            raise StoreError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if quantization not in QUANTIZATIONS:
            raise StoreError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
        quantized = quantization != "none"
        if quantized and dtype != "bfloat16":
            raise StoreError(f"a {quantization} store holds bfloat16 values, not {dtype}")
        if num_layers < 1 or d_model < 1:
            raise StoreError(f"num_layers and d_model must be positive (got {num_layers}, {d_model})")
        check_codec(compression)
        loc = parse_url(url)
        rows = rows_per_chunk or default_rows_per_chunk(num_layers, d_model, storage_dtype_of(dtype, quantization))
        if rows < 1:
            raise StoreError(f"rows_per_chunk must be positive (got {rows})")
        reserved = {"num_layers", "d_model", "dtype", "quantization", "format_version", "rows_committed", "created_at"}
        reserved &= info.keys()
        if reserved:
            raise StoreError(f"store metadata {sorted(reserved)} is set by the store itself, not by the caller")
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        try:
            version = FORMAT_VERSION if quantized else PLAIN_FORMAT_VERSION
            store_info = StoreInfo(
                num_layers=num_layers,
                d_model=d_model,
                dtype=dtype,
                quantization=quantization,
                format_version=version,
                created_at=stamp,
                **info,
            )
        except ValidationError as err:
            raise StoreError(f"invalid store metadata: {err.errors()[0]['msg']}") from None
        check_destination(loc.url, overwrite, exist_ok=exist_ok)
        attributes: dict[str, str] = {"logical_dtype": dtype, **({"quantization": quantization} if quantized else {})}
        arrays: dict[str, dict[str, Any]] = {
            name: {
                "shape": (reserve_rows, num_layers, d_model),
                "chunks": (rows, num_layers, d_model),
                "dtype": stored_np(dtype, quantization),
                "fill_value": 0,
                "attributes": attributes,
            }
            for name in ARRAYS
        }
        for name in SCALE_ARRAYS if quantized else ():
            # NaN: a committed chunk that went missing reads as rows holding NaN, never as plausible values
            arrays[name] = {
                "shape": (reserve_rows, num_layers),
                "chunks": (rows, num_layers),
                "dtype": np.dtype(np.float32),
                "fill_value": float("nan"),
            }
        arrays["token_ids"] = {
            "shape": (reserve_rows,),
            "chunks": (rows,),
            "dtype": np.dtype(np.int32),
            "fill_value": -1,
        }
        for spec in arrays.values():
            spec["compressors"] = codec_compressors(compression, spec["dtype"])
        with storage_errors(loc.url, "create the store"):
            metadata: dict[str, Any] = {INFO_KEY: store_info.model_dump(mode="json")}
            if exist_ok:
                try:
                    group = zarr.open_group(zarr_store(loc, read_only=False), mode="a", zarr_format=3)
                except ContainsGroupError:  # another shard made it between zarr's check and its write
                    group = zarr.open_group(zarr_store(loc, read_only=False), mode="r+", zarr_format=3)
                if INFO_KEY not in group.attrs:  # only when this process made the group
                    group.update_attributes(metadata)
            else:
                group = zarr.open_group(zarr_store(loc, read_only=False), mode="w", zarr_format=3, attributes=metadata)
            for name, spec in arrays.items():
                if name in group:
                    continue
                try:
                    group.create_array(name, **spec)
                except ContainsArrayError:  # another process made it meanwhile
                    if not exist_ok:
                        raise
        store = cls(loc, group, read_only=False)
        if reference is not None and store.load_reference() is None:
            store.write_reference(reference)
        return store

    @classmethod
    def open(cls, url: str, mode: Literal["r", "a"] = "r") -> ActivationStore:
        """Open an existing store for reading (`r`) or appending/updating (`a`)."""
        loc = parse_url(url)
        with storage_errors(loc.url, "open the store"):
            if not store_exists(loc.url):
                raise StoreError(f"{loc.url}: no activation store here (no zarr.json); check the URL")
            try:
                group = zarr.open_group(zarr_store(loc, read_only=mode == "r"), mode="r" if mode == "r" else "r+")
            except (ValueError, TypeError) as err:
                raise StoreError(f"{loc.url}: not a readable Zarr v3 group ({err})") from None
            return cls(loc, group, read_only=mode == "r")

    def _load_info(self) -> StoreInfo:
        raw = self.group.attrs.get(INFO_KEY)
        if raw is None:
            raise StoreError(f"{self.loc.url}: a Zarr group but not an activation store (no '{INFO_KEY}' attribute)")
        if not isinstance(raw, Mapping):
            raise StoreError(f"{self.loc.url}: invalid '{INFO_KEY}' metadata: a {type(raw).__name__}, not a mapping")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{self.loc.url}: store format_version {version}, this version of clt-pipeline reads "
                f"{FORMAT_VERSION} (quantised stores) and {PLAIN_FORMAT_VERSION}; convert the store or use a matching "
                "clt-pipeline"
            )
        quantization = raw.get("quantization", "none")
        if quantization not in QUANTIZATIONS:
            raise StoreError(
                f"{self.loc.url}: the store is quantised as {quantization!r}, which this version of clt-pipeline "
                f"cannot read (it reads {', '.join(QUANTIZATIONS)}); use a matching clt-pipeline"
            )
        if quantization != "none" and version != FORMAT_VERSION:
            raise StoreError(
                f"{self.loc.url}: quantization {quantization} in a format_version {version} store (quantised stores "
                f"are {FORMAT_VERSION}); the metadata is damaged"
            )
        try:
            return StoreInfo.model_validate(raw)
        except ValidationError as err:
            raise StoreError(f"{self.loc.url}: invalid '{INFO_KEY}' metadata: {err.errors()[0]}") from None

    def _array(self, name: str) -> zarr.Array:
        try:
            arr = self.group[name]
        except KeyError:
            raise StoreError(f"{self.loc.url}: store is missing the '{name}' array") from None
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{self.loc.url}: '{name}' is not an array")
        # Zarr skips writing chunks equal to the fill value and reads absent chunks as that value. Writing every
        # chunk keeps "a committed chunk object is missing" detectable as corruption (`clt verify`) instead of it
        # silently reading as zeros (or -1 token ids).
        return arr.with_config({"write_empty_chunks": True})

    def _check_layout(self) -> None:
        info, url = self.info, self.loc.url
        storage_np = stored_np(info.dtype, info.quantization)
        what = info.dtype if not self.quantized else f"{info.dtype} quantised as {info.quantization}"
        for arr in (self.inputs, self.targets):
            if arr.ndim != 3 or arr.shape[1:] != (info.num_layers, info.d_model):
                raise StoreError(
                    f"{url}: '{arr.basename}' has shape {arr.shape}, metadata says [N, {info.num_layers}, "
                    f"{info.d_model}]"
                )
            quantization = arr.attrs.get("quantization", "none")
            if (
                arr.dtype != storage_np
                or arr.attrs.get("logical_dtype", info.dtype) != info.dtype
                or quantization != info.quantization
            ):
                raise StoreError(
                    f"{url}: '{arr.basename}' is stored as {arr.dtype} (logical {arr.attrs.get('logical_dtype')}"
                    f"{'' if quantization == 'none' else ', quantization ' + str(quantization)}), metadata says {what}"
                )
            if arr.chunks[0] != self.rows_per_chunk or arr.chunks[1:] != arr.shape[1:]:
                raise StoreError(f"{url}: '{arr.basename}' chunks {arr.chunks} are not whole token rows")
        for arr in self.scale_arrays:
            if arr.ndim != 2 or arr.shape[1] != info.num_layers or arr.dtype != np.float32:
                raise StoreError(
                    f"{url}: '{arr.basename}' is {arr.dtype} {arr.shape}, a quantised store needs float32 "
                    f"[N, {info.num_layers}]"
                )
            if arr.chunks != (self.rows_per_chunk, info.num_layers):
                raise StoreError(f"{url}: '{arr.basename}' chunks {arr.chunks} differ from the row chunks")
        if self.token_ids.chunks[0] != self.rows_per_chunk:
            raise StoreError(f"{url}: 'token_ids' chunks {self.token_ids.chunks} differ from the row chunks")
        shortest = min(a.shape[0] for a in self.row_arrays)
        if info.rows_committed > shortest:
            raise StoreError(
                f"{url}: rows_committed={info.rows_committed} but the arrays hold only {shortest} rows; "
                "the store is truncated"
            )

    # --------------------------------------------------------------- geometry
    @property
    def url(self) -> str:
        return self.loc.url

    @property
    def num_rows(self) -> int:
        """Committed rows: the only rows a reader ever sees."""
        return self.info.rows_committed

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def d_model(self) -> int:
        return self.info.d_model

    @property
    def dtype(self) -> DType:
        return self.info.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.info.dtype][1]

    @property
    def quantization(self) -> Quantization:
        return self.info.quantization

    @property
    def quantized(self) -> bool:
        return self.info.quantization != "none"

    @property
    def storage_dtype(self) -> StorageDType:
        """How the values are stored: the logical dtype, or `int8`/`fp8` for a quantised store."""
        return storage_dtype_of(self.info.dtype, self.info.quantization)

    @property
    def scale_arrays(self) -> tuple[zarr.Array, ...]:
        """`inputs_scale`, `targets_scale` of a quantised store (none otherwise)."""
        return tuple(a for a in (self.inputs_scale, self.targets_scale) if a is not None)

    @property
    def row_arrays(self) -> tuple[zarr.Array, ...]:
        """Every array with one entry per row: inputs, targets, token ids and (quantised) the scales."""
        return (self.inputs, self.targets, self.token_ids, *self.scale_arrays)

    @property
    def codec(self) -> str:
        """The codec of the arrays (`codecs.CODECS`), read back from their metadata (`other: ...` for one this
        version never writes)."""
        return codec_name(self.inputs.compressors, np.dtype(self.inputs.dtype))

    @property
    def rows_per_chunk(self) -> int:
        return int(self.inputs.chunks[0])

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_rows / self.rows_per_chunk)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token row in storage, uncompressed (inputs + targets + token id, and the scales of a
        quantised store)."""
        values = 2 * self.num_layers * self.d_model * stored_np(self.dtype, self.quantization).itemsize
        return values + 4 + (2 * self.num_layers * 4 if self.quantized else 0)

    def chunk_rows(self, chunk: int, limit: int | None = None) -> tuple[int, int]:
        """Row range [start, stop) of a chunk, clipped to the committed rows (or to `limit`)."""
        start = chunk * self.rows_per_chunk
        return start, min(start + self.rows_per_chunk, self.num_rows if limit is None else limit)

    # ---------------------------------------------------------------- reading
    def read_storage(
        self, start: int, stop: int, *, limit: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw stored arrays of rows [start, stop) (bf16 as uint16, quantised codes as int8/uint8: `read_raw` adds
        their scales). `limit` is the end of the rows that may be read: the committed rows unless a writer that knows
        better (a shard re-reading its own rows) says otherwise."""
        raw = self.read_raw(start, stop, limit=limit)
        return raw.inputs, raw.targets, raw.token_ids

    def read_raw(self, start: int, stop: int, *, limit: int | None = None) -> RawRows:
        """Rows [start, stop) as stored, with the scales of a quantised store, reading the arrays concurrently
        (`limit` as in `read_storage`)."""
        limit = self.num_rows if limit is None else limit
        if not 0 <= start <= stop <= limit:
            raise IndexError(f"rows [{start}, {stop}) outside the committed rows [0, {limit})")
        others = (self.inputs, self.targets, *self.scale_arrays)
        with storage_errors(self.url, f"read rows {start}..{stop}"):
            futures = [_io_pool.submit(_read_slice, a, start, stop) for a in others]
            try:
                token_ids = _read_slice(self.token_ids, start, stop)
                inputs, targets, *scales = (f.result() for f in futures)
            except (RuntimeError, ValueError) as err:  # what zarr's codecs raise on corrupt bytes
                raise StoreError(
                    f"{self.url}: rows {start}..{stop} cannot be decoded ({err}); the store is corrupt: "
                    f"`clt verify {self.url}` lists the bad chunks"
                ) from None
        return RawRows(inputs, targets, token_ids, *scales)

    def decode(self, raw: RawRows) -> ActivationRows:
        """Stored rows as torch tensors in the logical dtype: bf16 bits viewed as bf16 (zero-copy), quantised codes
        dequantised (data/quantize.py)."""
        ids = torch.from_numpy(np.ascontiguousarray(raw.token_ids))
        if not self.quantized:
            return ActivationRows(from_storage(raw.inputs, self.dtype), from_storage(raw.targets, self.dtype), ids)
        if raw.inputs_scale is None or raw.targets_scale is None:
            raise ValueError("quantised rows without their scales")
        ref = self.reference
        return ActivationRows(
            dequantize(raw.inputs, raw.inputs_scale, *ref.tensors("inputs"), self.quantization),
            dequantize(raw.targets, raw.targets_scale, *ref.tensors("targets"), self.quantization),
            ids,
        )

    def encode(
        self, inputs: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray, token_ids: np.ndarray
    ) -> RawRows:
        """Rows `[n, L, d]` (tensors of any float dtype, or numpy arrays in the logical dtype's storage form: bf16 as
        uint16 bits) as this store stores them: rounded to the logical dtype, and quantised in a quantised store."""
        _check_rows(self, inputs, targets)
        if not self.quantized:
            return RawRows(to_storage(inputs, self.dtype), to_storage(targets, self.dtype), token_ids)
        ref = self.reference
        xs, xq = quantize(_as_bf16(inputs), *ref.tensors("inputs"), self.quantization)
        ys, yq = quantize(_as_bf16(targets), *ref.tensors("targets"), self.quantization)
        return RawRows(xs, ys, token_ids, xq, yq)

    def require(self, *, num_layers: int | None = None, d_model: int | None = None, dtype: str | None = None) -> None:
        """Refuse a store whose geometry differs from what a config or model expects."""
        expected = {"num_layers": num_layers, "d_model": d_model, "dtype": dtype}
        for name, want in expected.items():
            have = getattr(self.info, name)
            if want is not None and have != want:
                raise StoreError(
                    f"{self.url}: the store has {name}={have}, but {want} is expected; use a matching store"
                )

    def read(self, start: int, stop: int, *, limit: int | None = None) -> ActivationRows:
        """Rows [start, stop) as torch tensors in the logical dtype, dequantised in a quantised store (`limit` as in
        `read_storage`)."""
        return self.decode(self.read_raw(start, stop, limit=limit))

    # ------------------------------------------------------------ quantisation
    def load_reference(self) -> QuantReference | None:
        """The quantisation reference, read afresh until it is complete (None until a writer has written all of it:
        its values must match the digest its metadata holds); None for a store that is not quantised."""
        if not self.quantized:
            return None
        if self._reference is not None:
            return self._reference
        with storage_errors(self.url, "read the quantisation reference"):
            try:
                arr = child_array(self.group, REFERENCE_ARRAY, self.url)
            except KeyError:
                return None
            expected = (4, self.num_layers, self.d_model)
            if arr.shape != expected or arr.dtype != np.float32:
                raise StoreError(
                    f"{self.url}: '{REFERENCE_ARRAY}' is {arr.dtype} {arr.shape}, a quantised store needs float32 "
                    f"{list(expected)}; the store is damaged"
                )
            values = np.asarray(arr[...])
            if arr.attrs.get("sha256") != digest(values):
                return None  # its values are still being written (or their writer died: the next one rewrites them)
            rows = arr.attrs.get("rows", 0)
        self._reference = QuantReference.from_array(values, rows=rows if isinstance(rows, int) else 0)
        return self._reference

    @property
    def reference(self) -> QuantReference:
        """The quantisation reference of a quantised store; a StoreError if it has none (yet)."""
        reference = self.load_reference()
        if reference is None:
            raise StoreError(
                f"{self.url}: a {self.quantization} store without its complete quantisation reference "
                f"('{REFERENCE_ARRAY}'): a writer has not written it yet, or the store is damaged"
            )
        return reference

    def write_reference(self, reference: QuantReference) -> None:
        """Write the quantisation reference: its metadata with the digest first, then its values (one object), so
        that it counts only once whole. Only ever by one writer (`quantize.ensure_reference`), before any row."""
        if self.read_only:
            raise StoreError(f"{self.url}: opened read-only")
        if not self.quantized:
            raise StoreError(f"{self.url}: not a quantised store; it has no quantisation reference")
        values = reference.as_array()
        if values.shape != (4, self.num_layers, self.d_model) or not np.isfinite(values).all():
            raise StoreError(f"{self.url}: a quantisation reference of shape {values.shape} (or not finite)")
        attributes: dict[str, Any] = {
            "sha256": digest(values),
            "rows": int(reference.rows),
            "order": list(REFERENCE_ORDER),
        }
        with storage_errors(self.url, "write the quantisation reference"):
            arr = self.group.create_array(
                REFERENCE_ARRAY,
                shape=values.shape,
                chunks=values.shape,
                dtype=np.float32,
                fill_value=float("nan"),
                compressors=None,
                attributes=attributes,
                overwrite=True,
            )
            arr[...] = values
        self._reference = QuantReference.from_array(values, rows=int(reference.rows))

    def read_chunk(self, chunk: int, limit: int | None = None) -> ActivationRows:
        return self.read(*self.chunk_rows(chunk, limit), limit=limit)

    def iter_chunks(
        self, start_chunk: int = 0, stop_chunk: int | None = None, *, limit: int | None = None
    ) -> Iterator[ActivationRows]:
        """Chunks in order, the next one read in the background while the caller works on the current one
        (`limit` as in `read_storage`)."""
        stop_chunk = self.num_chunks if stop_chunk is None else stop_chunk
        pending = None
        for chunk in range(start_chunk, stop_chunk):
            nxt = _prefetch_pool.submit(self.read_chunk, chunk, limit)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()

    # ---------------------------------------------------------------- writing
    def writer(self, *, start: int | None = None, commit: Callable[[int], None] | None = None) -> StoreWriter:
        """A writer appending after the committed rows, or (with `start` and `commit`) filling a reserved range."""
        if self.read_only:
            raise StoreError(f"{self.url}: opened read-only; open with mode='a' to write")
        return StoreWriter(self, start=start, commit=commit)

    def update_info(self, **fields: Any) -> None:
        """Change fields of the `clt_dataset` attribute (one atomic metadata write)."""
        if self.read_only:
            raise StoreError(f"{self.url}: opened read-only")
        data = self.info.model_dump(mode="json")
        data.update(fields)
        try:
            info = StoreInfo.model_validate(data)
        except ValidationError as err:
            raise StoreError(f"invalid store metadata: {err.errors()[0]['msg']}") from None
        with storage_errors(self.url, "update the store metadata"):
            self.group.attrs[INFO_KEY] = info.model_dump(mode="json")
        self.info = info

    # ------------------------------------------------------------- norm stats
    def write_norm_stats(self, stats: NormStats) -> None:
        if self.read_only:
            raise StoreError(f"{self.url}: opened read-only")
        shape = (self.num_layers, self.d_model)
        with storage_errors(self.url, "write norm stats"):
            group = require_group(self.group, "norm_stats")
            for name in NormStats.ARRAYS:
                value = np.asarray(getattr(stats, name), dtype=np.float64)
                if value.shape != shape:
                    raise StoreError(f"norm stat {name} has shape {value.shape}, the store needs {shape}")
                # Written in place, never deleted and re-made: the shards that finish together all write these.
                try:
                    arr = group.require_array(name, shape=shape, dtype=np.float64, chunks=shape)
                except ContainsArrayError:  # another process made it meanwhile
                    arr = child_array(group, name, self.url)
                except TypeError:  # of another shape or dtype: replace it
                    arr = group.create_array(name, shape=shape, dtype=np.float64, chunks=shape, overwrite=True)
                arr[...] = value
            group.attrs["count"] = int(stats.count)

    def read_norm_stats(self) -> NormStats | None:
        """The stored normalisation statistics, or None if they were never computed."""
        with storage_errors(self.url, "read norm stats"):
            if "norm_stats" not in self.group:
                return None
            group = child_group(self.group, "norm_stats", self.url)
            try:
                arrays = {name: np.asarray(child_array(group, name, self.url)[...]) for name in NormStats.ARRAYS}
            except KeyError as err:
                raise StoreError(f"{self.url}: norm_stats is incomplete (missing {err})") from None
            return NormStats(count=int_attr(group, "count", self.url, default=0), **arrays)

    def __repr__(self) -> str:
        i = self.info
        return (
            f"ActivationStore({self.url!r}, rows={i.rows_committed}, layers={i.num_layers}, d_model={i.d_model}, "
            f"dtype={self.storage_dtype}, rows_per_chunk={self.rows_per_chunk}, codec={self.codec})"
        )


def _read_slice(arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    return np.asarray(arr[start:stop])


def _as_bf16(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Rows as a bfloat16 tensor: numpy uint16 arrays are bf16 bits, other arrays and tensors are converted."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.view(torch.bfloat16) if x.dtype == np.uint16 else t.to(torch.bfloat16)
    return x.detach().to("cpu", torch.bfloat16)


def store_exists(url: str) -> bool:
    """Whether a Zarr group (of any kind) exists at the URL; a missing S3 bucket is a StoreError, not False."""
    from clt_core.data.storage import check_bucket, filesystem

    loc = parse_url(url)
    with storage_errors(loc.url, "check whether the store exists"):
        fs = filesystem(loc)
        if fs.exists(f"{loc.path}/zarr.json"):
            return True
        check_bucket(loc, fs)
        return False


def _appears(url: str, wait_s: float = 5.0) -> bool:
    """Whether a store shows up within `wait_s`: a parallel writer creating it has made its directory before its
    zarr.json (the metadata is written to a temporary file, then renamed)."""
    deadline = time.monotonic() + wait_s
    while not store_exists(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def check_destination(url: str, overwrite: bool, *, exist_ok: bool = False) -> None:
    """Refuse to create a store where one exists (unless `overwrite` or `exist_ok`) or where other data lives
    (always: creating a store clears its location, and nothing that is not a store is ours to delete)."""
    from clt_core.data.storage import filesystem

    if store_exists(url):
        if not (overwrite or exist_ok):
            raise StoreError(f"{url} already exists; pass --overwrite to replace it")
        return
    loc = parse_url(url)
    with storage_errors(loc.url, "check the destination"):
        fs = filesystem(loc)
        occupied = fs.exists(loc.path) and (not fs.isdir(loc.path) or bool(fs.ls(loc.path)))
    if occupied and not (exist_ok and _appears(url)):  # a store begun elsewhere meanwhile is not "other data"
        raise StoreError(
            f"{loc.url} exists and is not an activation store; refusing to replace it: choose a new or empty location"
        )


class StoreWriter:
    """Appends rows to a store in whole chunks, committing after the data is written.

    Rows are buffered until a chunk is full; `close()` writes the partial tail chunk and trims the arrays to the
    committed length. Reopening a store whose last chunk is partial reloads that tail, so appending continues
    seamlessly and every chunk but the last stays full.

    With `start` (chunk-aligned) and `commit`, the writer fills rows from `start` on of arrays already sized for
    them (`reserve_rows`), as one shard of a parallel extraction does: each commit calls `commit(end_row)` instead
    of advancing `rows_committed`, and the arrays are never resized.
    """

    def __init__(
        self, store: ActivationStore, *, start: int | None = None, commit: Callable[[int], None] | None = None
    ) -> None:
        if (start is None) != (commit is None):
            raise ValueError("a ranged writer needs both `start` and `commit`")
        self.store = store
        rows = store.rows_per_chunk
        self._ranged = commit is not None
        self._commit = commit or (lambda stop: store.update_info(rows_committed=stop))
        self._buffer: list[RawRows] = []
        if start is not None:
            if start % rows:
                raise StoreError(f"a ranged writer starts at a chunk boundary (multiple of {rows}), not at {start}")
            self.committed = start
        else:
            self.committed = store.num_rows
        self._write_pos = self.committed - self.committed % rows  # always chunk-aligned
        if self.committed % rows:  # as stored: a quantised tail is rewritten with its codes, not quantised again
            self._buffer.append(store.read_raw(self._write_pos, self.committed, limit=self.committed))
        # The shortest array counts: a writer killed between resizing one array and the next leaves them uneven,
        # and Zarr silently drops writes past an array's end.
        self._capacity = min(a.shape[0] for a in store.row_arrays)

    @property
    def rows_buffered(self) -> int:
        return sum(b.num_rows for b in self._buffer)

    def append(
        self,
        inputs: torch.Tensor | np.ndarray,
        targets: torch.Tensor | np.ndarray,
        token_ids: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Add rows `[n, L, d]` (tensors, or numpy arrays in the logical dtype's storage form); they are stored as
        `ActivationStore.encode` stores them (quantised in a quantised store). Full chunks are written and committed
        at once."""
        st = self.store
        _check_rows(st, inputs, targets)
        n = inputs.shape[0]
        if token_ids is None:
            ids = np.full(n, -1, np.int32)
        else:
            ids = np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids)
            ids = ids.astype(np.int32, copy=False)
            if ids.shape != (n,):
                raise StoreError(f"token_ids has shape {ids.shape}, expected ({n},)")
        self.append_raw(st.encode(inputs, targets, ids) if n else _empty_raw(st))

    def append_raw(self, raw: RawRows) -> None:
        """Add rows already in the store's storage form (`read_raw`'s: codes and scales of a quantised store)."""
        st = self.store
        n = raw.num_rows
        _check_rows(st, raw.inputs, raw.targets)
        if raw.inputs.shape[0] != n:
            raise StoreError(f"{st.url}: {raw.inputs.shape[0]} rows of values but {n} token ids")
        scales = [a for a in (raw.inputs_scale, raw.targets_scale) if a is not None]
        if any(a.shape != (n, st.num_layers) for a in scales):
            raise StoreError(
                f"{st.url}: quantisation scales of shape {[a.shape for a in scales]}, expected {n, st.num_layers}"
            )
        if st.quantized != (raw.inputs_scale is not None and raw.targets_scale is not None):
            raise StoreError(f"{st.url}: rows {'without' if st.quantized else 'with'} quantisation scales")
        expected = np.dtype(stored_np(st.dtype, st.quantization))
        if raw.inputs.dtype != expected or raw.targets.dtype != expected:
            raise StoreError(f"{st.url}: rows stored as {raw.inputs.dtype}, the store stores {expected}")
        if n:
            if self.rows_buffered + n < st.rows_per_chunk:
                # Rows that wait in the buffer must not alias the caller's arrays, which it may reuse.
                raw = raw.copy()
            self._buffer.append(raw)
        if self.rows_buffered >= st.rows_per_chunk:
            self._flush(full_chunks_only=True)

    def _flush(self, full_chunks_only: bool) -> None:
        st = self.store
        if not self._buffer:
            return
        block = RawRows.concat(self._buffer)  # one buffered block is used as it is: concatenating would copy it
        n_write = block.num_rows - block.num_rows % st.rows_per_chunk if full_chunks_only else block.num_rows
        if n_write == 0:
            self._buffer = [block]
            return
        start, stop = self._write_pos, self._write_pos + n_write
        if self._ranged and stop > self._capacity:
            raise StoreError(f"{st.url}: rows {start}..{stop} run past the {self._capacity} rows reserved")
        pairs = [(st.inputs, block.inputs), (st.targets, block.targets), (st.token_ids, block.token_ids)]
        if st.quantized:
            assert st.inputs_scale is not None and st.targets_scale is not None
            assert block.inputs_scale is not None and block.targets_scale is not None
            pairs += [(st.inputs_scale, block.inputs_scale), (st.targets_scale, block.targets_scale)]
        with storage_errors(st.url, f"write rows {start}..{stop}"):
            if stop > self._capacity:
                self._capacity = max(stop, 2 * self._capacity)
                for arr in st.row_arrays:
                    arr.resize((self._capacity, *arr.shape[1:]))
            jobs = [_io_pool.submit(_write_slice, arr, start, stop, data[:n_write]) for arr, data in pairs]
            for job in jobs:
                job.result()
        self._commit(stop)  # the commit point
        self.committed = stop
        # A partial tail chunk stays buffered: it is rewritten, whole, when more rows arrive.
        keep_from = n_write - stop % st.rows_per_chunk
        self._write_pos = start + keep_from
        rest = block.rows(keep_from, block.num_rows).copy()
        self._buffer = [rest] if rest.num_rows else []

    def close(self) -> None:
        """Write and commit any buffered rows, and trim the arrays to exactly the committed rows (not when ranged)."""
        st = self.store
        self._flush(full_chunks_only=False)
        if self._ranged:
            return
        n = st.num_rows
        with storage_errors(st.url, "finalise the store"):
            for arr in st.row_arrays:
                if arr.shape[0] != n:
                    arr.resize((n, *arr.shape[1:]))
        self._capacity = n

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()


def _write_slice(arr: zarr.Array, start: int, stop: int, data: np.ndarray) -> None:
    arr[start:stop] = data


def _check_rows(store: ActivationStore, inputs: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> None:
    shape = (store.num_layers, store.d_model)
    if tuple(inputs.shape[1:]) != shape or tuple(targets.shape[1:]) != shape:
        raise StoreError(
            f"{store.url}: rows of shape {tuple(inputs.shape[1:])}/{tuple(targets.shape[1:])} do not match the "
            f"store's [L, d] = {list(shape)}"
        )
    if targets.shape[0] != inputs.shape[0]:
        raise StoreError(f"inputs have {inputs.shape[0]} rows but targets have {targets.shape[0]}")


def _empty_raw(store: ActivationStore) -> RawRows:
    """No rows, in the store's storage form."""
    shape = (0, store.num_layers, store.d_model)
    values = np.empty(shape, stored_np(store.dtype, store.quantization))
    scales = np.empty((0, store.num_layers), np.float32) if store.quantized else None
    return RawRows(values, values, np.empty(0, np.int32), scales, scales)
