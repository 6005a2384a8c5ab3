"""Load soak: the data path at full size, on local disk and on S3, with memory watched the whole way.

Three stages, each printing its figures (a GB here is 10**9 bytes of row data: inputs + targets + token ids):

1. Local disk: write a `--local-gb` store (16 layers x 1024 d_model, bf16: 64 KiB a row) with StoreWriter, then
   (a) scramble it with a `--budget` memory budget, and (b) run the training sampler over the scrambled store for
   `--epochs` epochs of `--batch-size` rows. Scramble and sampler each run in a fresh process (the scramble through
   bench/scramble.py's child) whose peak RSS (VmHWM) is reported: the scramble's against its budget, the sampler's
   against the store size (it should be set by the sampler's windows and batches, not by the store).
2. SeaweedFS: a server on loopback (data in the work directory), a `--s3-gb` store written into a bucket, then the
   same scramble (S3 -> S3, spill files on local disk) and sampler measurements.
3. Sharded extraction: `clt extract --shard 0/2` and `--shard 1/2` at once into one S3 store, with a tiny random
   Llama (tests/tiny_models.py) on `packaged:kjv`; wall time, tokens/s overall, rows == tokens and `verify_store`.

Rows are random bf16 values (as incompressible as real activations) drawn from a fixed pool of random rows, so
generating them costs a gather, not the RNG; the stores get analytic norm stats, so the sampler normalises as in
training. Nothing ever holds a whole store in memory. Everything lives under one work directory, removed at the end.

    .venv/bin/python bench/soak.py                                      # full size: ~12 GB free disk, ~3-5 min
    .venv/bin/python bench/soak.py --local-gb 0.5 --s3-gb 0.2 --extract-tokens 20000   # a quick smoke run
    .venv/bin/python bench/soak.py --skip-local --skip-extract --tmp /mnt/scratch     # S3 only, elsewhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import ByteSize, TypeAdapter  # noqa: E402

from bench.scramble import run_scramble  # noqa: E402  (bench/scramble.py's isolated scramble child)

S3_KEY, S3_SECRET, S3_BUCKET = "clt-soak-key", "clt-soak-secret-0123456789", "soak"
POOL_ROWS = 2048
"""Distinct random rows the synthetic stores are drawn from (a permutation of them per block, so no chunk repeats
a row)."""
BLOCK_CHUNKS = 8
"""Chunks handed to the store writer per append (it writes and compresses them concurrently)."""
DISK_FACTOR = 2.2
"""Disk a scramble stage needs per byte of row data: the source (compressed), the spill files (uncompressed) and
the growing destination (compressed) while the spill files shrink."""
MB = 1e6


def _mb(n: float) -> str:
    return f"{n / MB:,.0f} MB"


def tree_bytes(url: str) -> int:
    """Bytes a store takes in storage (compressed chunks and metadata)."""
    from clt_core.data.storage import filesystem, parse_url

    loc = parse_url(url)
    if loc.is_local:
        return sum(p.stat().st_size for p in Path(loc.path).rglob("*") if p.is_file())
    return int(filesystem(loc).du(loc.path))


# ------------------------------------------------------------------------------------------------------ the build
def build_store(url: str, gb: float, layers: int, d_model: int, seed: int = 0) -> dict[str, Any]:
    """Write a store of `gb` GB of row data from a pool of random rows, plus analytic norm stats; its figures."""
    import numpy as np
    import torch

    from clt_core.data.layout import to_storage
    from clt_core.data.norm_stats import NormStats
    from clt_core.data.store import ActivationStore

    store = ActivationStore.create(
        url,
        num_layers=layers,
        d_model=d_model,
        dtype="bfloat16",
        overwrite=True,
        model={"name": "soak-random"},
        text_dataset="random",
        seed=seed,
    )
    rows = math.ceil(gb * 1e9 / store.row_bytes)
    gen = torch.Generator().manual_seed(seed)
    pool = min(POOL_ROWS, rows)
    pool_x = to_storage(torch.randn(pool, layers, d_model, generator=gen), "bfloat16")  # N(0, 1)
    pool_y = to_storage(torch.randn(pool, layers, d_model, generator=gen).mul_(0.5).add_(1.0), "bfloat16")  # N(1, .5)
    rng = np.random.default_rng(seed)
    block = min(pool, BLOCK_CHUNKS * store.rows_per_chunk)
    t0 = time.perf_counter()
    with store.writer() as writer:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            idx = rng.permutation(pool)[:n]
            writer.append(pool_x[idx], pool_y[idx], np.arange(start, start + n, dtype=np.int32))
    shape = (layers, d_model)
    stats = NormStats(rows, np.zeros(shape), np.ones(shape), np.ones(shape), np.full(shape, 0.5))
    store.write_norm_stats(stats)
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "row_bytes": store.row_bytes,
        "rows_per_chunk": store.rows_per_chunk,
        "bytes": rows * store.row_bytes,
        "stored_bytes": tree_bytes(url),
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------- the sampler, isolated
def sample_child(url: str, batch_size: int, buffer_chunks: int, epochs: float) -> None:
    """Run in a fresh interpreter: draw `epochs` epochs of batches, then print the figures as one JSON line."""
    import psutil

    from clt_core.data.sampler import ActivationSampler, SamplerConfig
    from clt_core.data.scramble import peak_rss_bytes
    from clt_core.data.store import ActivationStore

    store = ActivationStore.open(url)
    baseline = psutil.Process().memory_info().rss
    config = SamplerConfig(batch_size=batch_size, buffer_chunks=buffer_chunks)
    batches = max(1, math.ceil(epochs * store.num_rows / batch_size))
    half = max(2, batches // 2)  # from the second batch on, the previous and the new batch are both alive
    t0 = time.perf_counter()
    with ActivationSampler(store, config) as sampler:
        batch = next(sampler)
        first = time.perf_counter() - t0
        peak_half = peak_rss_bytes()
        for i in range(1, batches):
            batch = next(sampler)
            if i + 1 == half:
                peak_half = peak_rss_bytes()
        seconds = time.perf_counter() - t0
        epoch = sampler.epoch
    print(
        json.dumps(
            {
                "seconds": seconds,
                "first_batch_s": first,
                "batches": batches,
                "rows": batches * batch_size,
                "bytes": batches * batch_size * store.row_bytes,
                "epoch_after": epoch,
                "batch_shape": list(batch.inputs.shape),
                "batch_dtype": str(batch.inputs.dtype),
                "window_rows": buffer_chunks * store.rows_per_chunk,
                "window_bytes": buffer_chunks * store.rows_per_chunk * store.row_bytes,
                "batch_bytes": batch_size * store.row_bytes,
                "prefetch_windows": config.prefetch_windows,
                "read_workers": config.read_workers,
                "chunk_bytes": store.rows_per_chunk * store.row_bytes,
                "half_batches": half,
                "peak_rss_half": peak_half,
                "peak_rss": peak_rss_bytes(),
                "baseline_rss": baseline,
            }
        )
    )


def run_sampler(url: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child-sample", url, "--batch-size", str(args.batch_size)]
    cmd += ["--buffer-chunks", str(args.buffer_chunks), "--epochs", str(args.epochs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"sampler child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- one data path
def soak_store(label: str, src: str, dst: str, gb: float, args: argparse.Namespace, env: dict[str, str]) -> None:
    """Build `src`, scramble it into `dst`, sample `dst`; print every figure as it comes."""
    budget = TypeAdapter(ByteSize).validate_python(args.budget)
    b = build_store(src, gb, args.layers, args.d_model)
    print(
        f"{label} store:    {b['rows']:,} rows x {b['row_bytes']:,} B = {_mb(b['bytes'])} of rows "
        f"({args.layers} layers x {args.d_model} d_model bf16, {b['rows_per_chunk']} rows/chunk), "
        f"{_mb(b['stored_bytes'])} stored",
        flush=True,
    )
    print(
        f"{label} write:    {b['bytes'] / MB / b['seconds']:8,.1f} MB/s  ({b['seconds']:.1f} s, StoreWriter, zstd)",
        flush=True,
    )

    # bench/scramble.py's child: its spill files go to the system temp dir, so point TMPDIR at the work directory.
    s = run_scramble(src, dst, args.budget, args.workers, args.seed, {**env, "TMPDIR": str(args.work)})
    over = s["peak_rss"] - budget
    print(
        f"{label} scramble: {s['bytes'] / MB / s['seconds']:8,.1f} MB/s  ({_mb(s['bytes'])} in {s['seconds']:.1f} s, "
        f"{s['buckets']} buckets, {args.workers} workers)",
        flush=True,
    )
    print(
        f"{label} scramble peak RSS: {_mb(s['peak_rss'])} = budget {_mb(budget)} {'+' if over >= 0 else '-'} "
        f"{_mb(abs(over))} (baseline after imports {_mb(s['baseline_rss'])}; goal <= budget + 300 MB: "
        f"{'OK' if over <= 300 * MB else 'MISSED'})",
        flush=True,
    )

    r = run_sampler(dst, args, env)
    t = r["seconds"]
    print(
        f"{label} sampler:  {r['rows'] / t:8,.0f} rows/s {r['bytes'] / MB / t:8,.1f} MB/s  ({r['batches']} batches "
        f"{r['batch_shape']} {r['batch_dtype']} in {t:.1f} s = {args.epochs:g} epoch(s), normalised; "
        f"first batch after {r['first_batch_s']:.1f} s)",
        flush=True,
    )
    # What the sampler keeps alive: the queued windows, the one the producer waits to queue and the one it fills,
    # the windows a batch spans, the previous and the new batch, and each reader's chunk (raw + float32 copies).
    windows = r["prefetch_windows"] + 2 + math.ceil(args.batch_size / r["window_rows"]) + 1
    model = windows * r["window_bytes"] + 2 * r["batch_bytes"] + r["read_workers"] * 3 * r["chunk_bytes"]
    grew = r["peak_rss"] - r["peak_rss_half"]
    if r["batches"] >= 8:
        flat = grew <= 0.1 * r["peak_rss_half"]
        trend = (
            f"peak after {r['half_batches']} of {r['batches']} batches {_mb(r['peak_rss_half'])}, "
            f"+{_mb(grew)} in the second half: {'flat (< 10 %)' if flat else 'STILL RISING'}"
        )
    else:
        trend = f"{r['batches']} batches: too few to tell a trend"
    print(
        f"{label} sampler peak RSS: {_mb(r['peak_rss'])} = baseline {_mb(r['baseline_rss'])} + "
        f"{_mb(r['peak_rss'] - r['baseline_rss'])} (buffer model: {windows} windows of {_mb(r['window_bytes'])} + "
        f"2 batches of {_mb(r['batch_bytes'])} + {r['read_workers']} readers' chunks = {_mb(model)}; "
        f"store {_mb(b['bytes'])}); {trend}",
        flush=True,
    )


# ------------------------------------------------------------------------------------------------------ extraction
def soak_extract(url: str, args: argparse.Namespace, env: dict[str, str]) -> None:
    """Two `clt extract` shards at once into one store; wall time, tokens/s, row count and verify."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before huggingface_hub is imported
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_llama

    from clt_core.data.store import ActivationStore
    from clt_core.data.verify import verify_store

    model = tiny_llama(args.work / "tiny-llama")
    clt = Path(sys.executable).parent / "clt"
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    child_env = {**env, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base = [str(clt), "extract", "-q", "--out", url, "--model", str(model), "--text", "packaged:kjv"]
    base += ["--tokens", str(args.extract_tokens), "--compute-dtype", "float32"]
    procs: list[tuple[subprocess.Popen[str], float]] = []
    t0 = time.perf_counter()
    try:
        for i in range(2):
            cmd = [*base, "--shard", f"{i}/2"]
            p = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append((p, time.perf_counter()))
        results = []
        for i, (p, started) in enumerate(procs):
            out, err = p.communicate()
            results.append((i, p.returncode, time.perf_counter() - started, out.strip(), err))
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - t0
    for i, rc, _, _, err in results:
        if rc:
            raise SystemExit(f"extract shard {i}/2 failed ({rc}):\n{err[-3000:]}")
    store = ActivationStore.open(url)
    rows = store.num_rows
    print(
        f"extract: 2 shards x {args.extract_tokens // 2:,} tokens of a tiny Llama ({store.num_layers} layers x "
        f"{store.d_model}, {threads} torch thread(s) each) into {url}",
        flush=True,
    )
    for i, _, seconds, out, _ in results:
        last = out.splitlines()[-1] if out else "(no output)"
        print(f"extract shard {i}/2: process {seconds:.1f} s: {last}", flush=True)
    print(
        f"extract wall: {wall:.1f} s for both shards = {args.extract_tokens / wall:,.0f} tokens/s overall "
        f"(model load and corpus count included)",
        flush=True,
    )
    report = verify_store(url, progress=False)
    same = rows == args.extract_tokens
    print(
        f"extract rows: {rows:,} {'==' if same else '!='} tokens {args.extract_tokens:,}: "
        f"{'OK' if same else 'MISMATCH'}; {_mb(tree_bytes(url))} stored",
        flush=True,
    )
    print(f"extract verify: {'OK' if report.ok else 'FAILED'}: {report.summary()}", flush=True)


# -------------------------------------------------------------------------------------------------------- main
def disk_needed(args: argparse.Namespace) -> float:
    """Bytes of free disk the run needs: the larger stage (local stores are removed before the S3 stage)."""
    local = 0.0 if args.skip_local else DISK_FACTOR * args.local_gb * 1e9
    s3 = 0.0 if args.skip_s3 else DISK_FACTOR * args.s3_gb * 1e9 + 0.5e9  # SeaweedFS's own files
    extract = 0.0 if args.skip_extract else 0.5e9  # a few hundred MB of tiny-model rows at most
    return max(local, s3 + extract) + 1e9  # margin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-gb", type=float, default=5.0, help="row data of the local store, GB")
    parser.add_argument("--s3-gb", type=float, default=1.0, help="row data of the S3 store, GB")
    parser.add_argument("--skip-local", action="store_true", help="skip the local-disk stage")
    parser.add_argument("--skip-s3", action="store_true", help="skip the SeaweedFS stage")
    parser.add_argument("--skip-extract", action="store_true", help="skip the sharded extraction")
    parser.add_argument("--tmp", default=None, help="parent of the work directory (default: the system temp dir)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--budget", default="512MB", help="scramble memory budget")
    parser.add_argument("--workers", type=int, default=4, help="scramble read workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4096, help="sampler batch size (rows)")
    parser.add_argument("--buffer-chunks", type=int, default=8, help="sampler shuffle window (chunks)")
    parser.add_argument("--epochs", type=float, default=1.0, help="sampler epochs to draw")
    parser.add_argument("--extract-tokens", type=int, default=200_000, help="tokens of the sharded extraction")
    parser.add_argument("--child-sample", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_sample:
        sample_child(args.child_sample, args.batch_size, args.buffer_chunks, args.epochs)
        return

    parent = Path(args.tmp or tempfile.gettempdir()).expanduser()
    if not parent.is_dir():
        raise SystemExit(f"--tmp {parent} is not a directory")
    need, free = disk_needed(args), shutil.disk_usage(parent).free
    if free < need:
        raise SystemExit(
            f"{parent} has {free / 1e9:.1f} GB free, the soak needs about {need / 1e9:.1f} GB (each scramble holds "
            f"its source, its spill files and its destination at once); free space, pass --tmp on a larger disk, "
            f"or lower --local-gb / --s3-gb"
        )
    args.work = Path(tempfile.mkdtemp(prefix="clt-soak-", dir=parent))
    print(
        f"soak: work dir {args.work} ({free / 1e9:.1f} GB free, needs ~{need / 1e9:.1f} GB), {os.cpu_count()} CPUs, "
        f"budget {args.budget}, batch {args.batch_size}",
        flush=True,
    )
    t_start = time.perf_counter()
    try:
        env = dict(os.environ)
        if not args.skip_local:
            print("\n== local disk", flush=True)
            t0 = time.perf_counter()
            local = args.work / "local"
            soak_store("local", str(local / "src"), str(local / "scrambled"), args.local_gb, args, env)
            shutil.rmtree(local, ignore_errors=True)  # the S3 stage gets the disk back
            print(f"local stage: {time.perf_counter() - t0:.0f} s", flush=True)
        if not (args.skip_s3 and args.skip_extract):
            from infra.stack.seaweedfs import seaweedfs

            (args.work / "weed").mkdir()
            with seaweedfs(args.work / "weed", S3_KEY, S3_SECRET, (S3_BUCKET,)) as server:
                env = {**os.environ, **server.env()}
                os.environ.update(server.env())  # this process writes the S3 store itself
                if not args.skip_s3:
                    print(f"\n== SeaweedFS S3 on loopback ({server.endpoint})", flush=True)
                    t0 = time.perf_counter()
                    src, dst = f"s3://{S3_BUCKET}/src", f"s3://{S3_BUCKET}/scrambled"
                    soak_store("s3", src, dst, args.s3_gb, args, env)
                    print(f"s3 stage: {time.perf_counter() - t0:.0f} s", flush=True)
                if not args.skip_extract:
                    print("\n== sharded extraction into S3", flush=True)
                    t0 = time.perf_counter()
                    soak_extract(f"s3://{S3_BUCKET}/extracted", args, env)
                    print(f"extract stage: {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"\nsoak: done in {time.perf_counter() - t_start:.0f} s; {args.work} removed", flush=True)


if __name__ == "__main__":
    main()
