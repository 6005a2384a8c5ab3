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

from clt_core.data.hdf5.layout import MANIFEST_DTYPE
from clt_core.data.hdf5.reading import import_hdf5
from clt_core.data.hdf5.writing import export_hdf5

__all__ = ["MANIFEST_DTYPE", "export_hdf5", "import_hdf5"]
