"""The compression codecs of an activation store's arrays (docs/formats.md): their names, the zarr compressors
each stands for, and the name of the compressors an array's metadata holds. No torch here, so configs that name a
codec (the scramble's) stay light to import."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast, get_args

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec

from clt_core.errors import StoreError

Codec = Literal["zstd", "none", "blosc-lz4", "blosc-zstd"]
"""Compression of a store's arrays, after zarr's `bytes` codec; the arrays' own metadata records it."""
DEFAULT_CODEC: Codec = "blosc-lz4"
"""For new stores. On 2,048 rows of real SmolLM2-135M MLP inputs (bf16), one core: `blosc-lz4` 1.36× smaller than raw,
decoded at 3.1 GB/s; `zstd` level 1 (the only codec of stores written before the setting) 1.27×, 1.4 GB/s; lossless
coding of bf16 tops out near 1.3–1.5×."""
# codec name -> its zarr compressors for an array of items of `typesize` bytes (Blosc shuffles in those units)
_COMPRESSORS: dict[str, Callable[[int], tuple[BytesBytesCodec, ...]]] = {
    "zstd": lambda typesize: (ZstdCodec(level=1),),
    "none": lambda typesize: (),
    "blosc-lz4": lambda typesize: (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=typesize),),
    "blosc-zstd": lambda typesize: (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=typesize),),
}
CODECS: tuple[Codec, ...] = get_args(Codec)
assert set(CODECS) == _COMPRESSORS.keys()


def check_codec(name: str) -> Codec:
    """`name` if it is a codec this version writes; a one-line StoreError naming the valid ones otherwise."""
    if name not in _COMPRESSORS:
        raise StoreError(f"unknown codec {name!r}; use one of {', '.join(CODECS)}")
    return cast(Codec, name)


def codec_compressors(codec: str, dtype: np.dtype) -> tuple[BytesBytesCodec, ...]:
    """The zarr compressors of `codec` for an array stored as `dtype`."""
    return _COMPRESSORS[check_codec(codec)](np.dtype(dtype).itemsize)


def codec_name(compressors: Sequence[Any], dtype: np.dtype) -> str:
    """The codec name of an array's compressors (as read back from its metadata), or, for compressors this version
    never writes, `other: ` and their JSON."""
    found = tuple(compressors)
    for name in CODECS:
        if found == codec_compressors(name, dtype):
            return name
    return "other: " + json.dumps([c.to_dict() if hasattr(c, "to_dict") else repr(c) for c in found])
