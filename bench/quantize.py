"""Quantised storage (int8, fp8) against bfloat16 on a real store: bytes per token, quantisation error, sampler
throughput locally and on S3.

    .venv/bin/python bench/quantize.py [--src demo-output/stores/acts-c53162240167] [--work /tmp/clt-quant]
                                       [--repeats 5] [--s3-rows 16384] [--no-s3] [--keep]

The source store (read only) is converted by `clt scramble` (seed 0, the source's chunking) into one store per
storage dtype (bfloat16, int8, fp8) and codec (blosc-lz4, zstd): the same rows in the same order in each, so row i
of the int8 store is the quantised row i of the bfloat16 one. Then:

- bytes per token: the stores' size on disk (every object under the store) over their rows, against raw bf16
  (2·L·d·2 bytes of values + 4 of token id);
- quantisation error: NMSE of the stored (dequantised) values against the exact bf16 ones over all rows,
  Σ(stored - exact)² / Σ(exact - mean)², the mean per layer and dimension, for inputs and targets; also the mean
  over layers of the per-layer NMSE;
- sampler throughput: rows/s through `ActivationSampler` (normalised with the store's norm stats, bf16 batches, batch
  4096, the default 8-chunk windows and 8 readers) for `--epochs` times as many rows as the store holds, after the
  first window, the stores taken in turn `--repeats` times (medians), with the CPU time of the process tree per row
  (steadier than wall time where other work shares the cores); the stores are in the page cache (read once
  before), so this is decoding and preparation, not the disk;
- on S3 (SeaweedFS on loopback, as bench/store_read.py): the first `--s3-rows` rows of each blosc-lz4 store copied as
  stored, and the same sampler measurement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_core.data.sampler import ActivationSampler, SamplerConfig
from clt_core.data.scramble import ScrambleConfig, scramble_store
from clt_core.data.store import ActivationStore

DTYPES = ("bfloat16", "int8", "fp8")
CODECS = ("blosc-lz4", "zstd")


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_stores(src: str, work: Path) -> dict[tuple[str, str], str]:
    stores = {}
    for codec in CODECS:
        for dtype in DTYPES:
            url = str(work / f"{dtype}-{codec}")
            if not (Path(url) / "zarr.json").exists() or not ActivationStore.open(url).info.scrambled:
                t0 = time.perf_counter()
                config = ScrambleConfig(seed=0, storage_dtype=dtype, codec=codec, tmp_dir=str(work))  # type: ignore[arg-type]
                scramble_store(src, url, config, overwrite=True, progress=False)
                print(f"  made {url} in {time.perf_counter() - t0:.0f} s", flush=True)
            stores[dtype, codec] = url
    return stores


def nmse(stored: ActivationStore, exact: ActivationStore, block: int = 2048) -> dict[str, float]:
    """NMSE of every row of `stored` against the same row of `exact` (float64 sums)."""
    L, d = exact.num_layers, exact.d_model
    sums = {k: {"err": torch.zeros(L, d, dtype=torch.float64), "x": torch.zeros(L, d, dtype=torch.float64),
                "xx": torch.zeros(L, d, dtype=torch.float64)} for k in ("inputs", "targets")}  # fmt: skip
    n = exact.num_rows
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        a, b = stored.read(lo, hi), exact.read(lo, hi)
        assert torch.equal(a.token_ids, b.token_ids)
        for kind in ("inputs", "targets"):
            x = getattr(b, kind).to(torch.float64)
            e = getattr(a, kind).to(torch.float64) - x
            s = sums[kind]
            s["err"] += e.square().sum(0)
            s["x"] += x.sum(0)
            s["xx"] += x.square().sum(0)
    out = {}
    for kind, s in sums.items():
        var = s["xx"] - s["x"].square() / n  # Σ (x - mean)² per layer and dimension
        out[kind] = float(s["err"].sum() / var.sum())
        out[kind + "_layer_mean"] = float((s["err"].sum(1) / var.sum(1)).mean())
    return out


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and of its descendants still running (the S3 server), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    me, total = os.getpid(), 0.0
    for pid in cpu:
        p = pid
        while p > 1 and p != me:
            p = parents.get(p, 0)
        if p == me and pid != me:
            total += cpu[pid]
    return total + time.process_time()


def sampler_seconds(store: ActivationStore, batch_size: int, epochs: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds for the sampler to deliver as many rows as the store holds (`epochs` times: the time of
    one), after its first window; CPU of the whole process tree (on a shared machine the steadier figure)."""
    sampler = ActivationSampler(store, SamplerConfig(batch_size=batch_size))
    next(sampler)
    batches = max(1, epochs * store.num_rows // batch_size)
    start, cpu = time.perf_counter(), tree_cpu_seconds()
    for _ in range(batches):
        next(sampler)
    seconds, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu
    sampler.close()
    scale = store.num_rows / (batches * batch_size)
    return seconds * scale, cpu * scale


def throughput(label: str, stores: dict[str, ActivationStore], repeats: int, batch_size: int, epochs: int) -> None:
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in stores}
    for _ in range(repeats):
        for name, store in stores.items():
            times[name].append(sampler_seconds(store, batch_size, epochs))
    print(f"\nsampler throughput, {label} (batch {batch_size}, normalised bf16 batches; median of {repeats}):")
    first = next(iter(stores))
    base = statistics.median(t for t, _ in times[first])
    base_cpu = statistics.median(c for _, c in times[first])
    for name, values in times.items():
        t, c = statistics.median(v for v, _ in values), statistics.median(c for _, c in values)
        n = stores[name].num_rows
        print(
            f"  {name:22s} {n / t:>9,.0f} rows/s  {base / t:5.2f}x  CPU {c / n * 1e6:5.0f} µs/row  {base_cpu / c:5.2f}x"
            f"   (rows/s: {', '.join(f'{n / v:,.0f}' for v, _ in values)})"
        )


def copy_rows(src: ActivationStore, url: str, rows: int) -> ActivationStore:
    """The first `rows` rows of `src` at `url`, as stored (codes, scales and reference of a quantised store)."""
    dst = ActivationStore.create(
        url,
        num_layers=src.num_layers,
        d_model=src.d_model,
        dtype=src.dtype,
        quantization=src.quantization,
        reference=src.load_reference(),
        rows_per_chunk=src.rows_per_chunk,
        compression=src.codec,  # type: ignore[arg-type]
        overwrite=True,
    )
    with dst.writer() as writer:
        for lo in range(0, rows, 8 * src.rows_per_chunk):
            writer.append_raw(src.read_raw(lo, min(rows, lo + 8 * src.rows_per_chunk)))
    stats = src.read_norm_stats()
    assert stats is not None
    dst.write_norm_stats(stats)
    return ActivationStore.open(url)


def throughputs(args: argparse.Namespace, opened: dict[tuple[str, str], ActivationStore], n: int) -> None:
    if args.only != "s3":
        for store in opened.values():  # into the page cache
            for _ in store.iter_chunks():
                pass
        local = {f"{dtype} {codec}": opened[dtype, codec] for codec in CODECS for dtype in DTYPES}
        throughput("local disk (page cache)", local, args.repeats, args.batch_size, args.epochs)
    if args.no_s3 or args.only == "local":
        return
    from infra.stack.seaweedfs import seaweedfs

    work = Path(next(iter(opened.values())).loc.path).parent
    with seaweedfs(str(work / "s3"), "bench-key", "bench-secret-0123456789", ("acts",)) as server:
        os.environ.update(server.env())
        rows = min(args.s3_rows, n)
        remote = {}
        for dtype in DTYPES:
            store = opened[dtype, "blosc-lz4"]
            remote[f"{dtype} blosc-lz4"] = copy_rows(store, f"s3://acts/{dtype}", rows)
        throughput(f"SeaweedFS S3 on loopback, {rows:,} rows", remote, args.repeats, args.batch_size, args.epochs)
    shutil.rmtree(work / "s3", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="demo-output/stores/acts-c53162240167")
    parser.add_argument("--work", default=None, help="where the converted stores go (default: a temp directory)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--s3-rows", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each store a measurement takes")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--only", choices=["local", "s3"], help="only the sampler throughput, locally or on S3")
    parser.add_argument("--keep", action="store_true", help="keep the converted stores")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="clt-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = ActivationStore.open(args.src)
        L, d, n = src.num_layers, src.d_model, src.num_rows
        print(f"source {src.url}: {n:,} rows, {L} layers x {d}, {src.storage_dtype}, codec {src.codec}", flush=True)
        stores = make_stores(args.src, work)
        opened = {key: ActivationStore.open(url) for key, url in stores.items()}

        if args.only:
            throughputs(args, opened, n)
            return
        raw_bf16 = 2 * L * d * 2 + 4
        print(f"\nbytes per token on disk (raw bf16: {raw_bf16:,} = 2·L·d·2 + 4):")
        print(f"  {'source (' + src.codec + ')':22s} {disk_bytes(Path(src.loc.path)) / n:>9,.0f}")
        for (dtype, codec), store in opened.items():
            per_row = disk_bytes(Path(store.loc.path)) / store.num_rows
            print(f"  {dtype + ' ' + codec:22s} {per_row:>9,.0f}   {raw_bf16 / per_row:5.2f}x smaller than raw bf16   "
                  f"(uncompressed {store.row_bytes:,})")  # fmt: skip

        print("\nquantisation error, NMSE of the stored values against the exact bf16 ones (all rows):")
        exact = opened["bfloat16", "blosc-lz4"]
        for dtype in ("int8", "fp8"):
            e = nmse(opened[dtype, "blosc-lz4"], exact)
            layers = f"inputs {e['inputs_layer_mean']:.2e}, targets {e['targets_layer_mean']:.2e}"
            print(f"  {dtype:5s} inputs {e['inputs']:.2e}  targets {e['targets']:.2e}   (mean over layers of the "
                  f"per-layer NMSE: {layers})")  # fmt: skip

        throughputs(args, opened, n)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
