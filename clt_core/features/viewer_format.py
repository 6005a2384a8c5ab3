"""circuit-tracer's feature files: the records its graph viewer shows for a feature, and how they are stored.

What circuit-tracer 0.5's viewer reads (`circuit_tracer/frontend/assets/feature_examples/init-feature-examples.js`
and `util.js`; the record's fields are `frontend/feature_models.py`'s `Model`). A graph node's feature is
`cantor(layer, index) = (layer + index)(layer + index + 1)/2 + index`, and `loadFeature(scan, feature)` reads:

1. a scan starting with `./` (local serving): the JSON file `{scan}/{cantor}.json` (`write_feature_files`); with
   `circuit-tracer`'s local server, `./graph_data/X` is `DATA_DIR/X`;
2. otherwise, when the Hugging Face repository of the scan (`repo` or `repo//subfolder`, `@revision`) holds
   `features/index.json.gz`: the binary format (`LayerFileWriter`, `write_index`); the index is gzipped JSON
   `{"<layer>": {"filename": "layer_<layer>.bin", "offsets": [F + 1 ints]}}` (file names relative to `features/`),
   and feature i of a layer is bytes `[offsets[i], offsets[i+1])` of its file: a 4-byte little-endian length n, then
   n bytes of gzip-compressed JSON (the viewer inflates zlib or gzip; the published files are gzip);
3. otherwise `./features/{scan}/{cantor}.json` on Anthropic's CDN.

A record: `transcoder_id`, `index` (the feature's index in its layer), `layer` (ours; the viewer ignores it),
`examples_quantiles: [{quantile_name, examples: [{tokens, tokens_acts_list, train_token_ind,
is_repeated_datapoint}]}]`, `top_logits`, `bottom_logits` (token strings), `act_min`, `act_max`, `quantile_values`,
`histogram`, `activation_frequency`.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path
from typing import IO, Any

INDEX_FILE = "index.json.gz"
RECORD_KEYS = (
    "transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min", "act_max",
    "quantile_values", "histogram", "activation_frequency",
)  # fmt: skip
"""The keys circuit-tracer's `feature_models.Model` requires."""
EXAMPLE_KEYS = ("tokens", "tokens_acts_list", "train_token_ind", "is_repeated_datapoint")


def cantor(layer: int, index: int) -> int:
    """The viewer's feature id of feature `index` of `layer` (circuit-tracer's `_cantor_pairing`)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def layer_filename(layer: int) -> str:
    return f"layer_{layer}.bin"


def encode_record(record: dict[str, Any]) -> bytes:
    """One binary record: a 4-byte little-endian length, then the gzip-compressed JSON (`mtime` 0: reproducible)."""
    payload = gzip.compress(json.dumps(record, separators=(",", ":")).encode(), compresslevel=6, mtime=0)
    return struct.pack("<I", len(payload)) + payload


def decode_record(raw: bytes) -> dict[str, Any]:
    """A record from its bytes (the viewer's way: the length prefix bounds the compressed JSON; zlib or gzip)."""
    if len(raw) < 4:
        raise ValueError(f"a feature record needs a 4-byte length prefix, got {len(raw)} bytes")
    (length,) = struct.unpack("<I", raw[:4])
    if length > len(raw) - 4:
        raise ValueError(f"the record declares {length} bytes but {len(raw) - 4} follow")
    data = zlib.decompress(raw[4 : 4 + length], wbits=47)  # 32 + 15: zlib or gzip header, detected
    result: dict[str, Any] = json.loads(data)
    return result


class LayerFileWriter:
    """Appends one layer's records, in feature order, to `layer_L.bin` and keeps their offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets = [0]
        self._fh: IO[bytes] = open(path, "wb")  # noqa: SIM115  # closed by `close`

    def write(self, record: dict[str, Any]) -> None:
        raw = encode_record(record)
        self._fh.write(raw)
        self.offsets.append(self.offsets[-1] + len(raw))

    def close(self) -> list[int]:
        self._fh.close()
        return self.offsets


def write_index(directory: Path, offsets: dict[int, list[int]]) -> Path:
    """`features/index.json.gz`: each layer's file name and record offsets."""
    index = {str(layer): {"filename": layer_filename(layer), "offsets": o} for layer, o in sorted(offsets.items())}
    path = directory / INDEX_FILE
    path.write_bytes(gzip.compress(json.dumps(index).encode(), mtime=0))
    return path


def read_index(directory: str | Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(gzip.decompress((Path(directory) / INDEX_FILE).read_bytes()))
    return result


def read_feature(directory: str | Path, layer: int, index: int) -> dict[str, Any]:
    """Feature `index` of `layer` from a `features/` directory, as the viewer reads it (a byte range, then the
    length-prefixed record)."""
    entry = read_index(directory)[str(layer)]
    start, stop = entry["offsets"][index], entry["offsets"][index + 1]
    with open(Path(directory) / entry["filename"], "rb") as fh:
        fh.seek(start)
        return decode_record(fh.read(stop - start))
