"""Sampler throughput next to the raw sequential read throughput of the same store, locally and on S3.

    .venv/bin/python bench/store_read.py [--rows 16384 --layers 30 --d-model 576] [--no-s3]

"raw" reads every chunk in order with the store's own reader (decoding included); the sampler draws shuffled
batches (windows of `buffer_chunks` random chunks, rows permuted), normalised with the store's norm stats and in
the store's dtype (the default), also converted to float32, and with raw values. Each figure is the median of
`--repeats` runs, taken alternately in one process, so the ratios compare like with like.
Goals (issue 3): sampler >= 50 % of raw locally and >= 30 % on S3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.sampler import ActivationSampler, SamplerConfig
from clt_core.data.store import ActivationStore


def write_store(url: str, rows: int, layers: int, d_model: int, rows_per_chunk: int | None) -> ActivationStore:
    """Random bf16 activations (as incompressible as real ones) with unique token ids."""
    store = ActivationStore.create(
        url, num_layers=layers, d_model=d_model, dtype="bfloat16", rows_per_chunk=rows_per_chunk, overwrite=True
    )
    gen = torch.Generator().manual_seed(0)
    block = store.rows_per_chunk * 4
    with store.writer() as writer:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            x = torch.randn(n, layers, d_model, generator=gen)
            writer.append(x, x * 0.5 + 1, torch.arange(start, start + n))
    compute_norm_stats(store, progress=False)
    return ActivationStore.open(url)


def raw_read(store: ActivationStore) -> float:
    """Seconds to read every committed chunk in order (prefetching the next one)."""
    start = time.perf_counter()
    for _ in store.iter_chunks():
        pass
    return time.perf_counter() - start


def sampler_read(store: ActivationStore, config: SamplerConfig) -> float:
    """Seconds for the sampler to deliver as many rows as the store holds (after its first window is ready)."""
    sampler = ActivationSampler(store, config)
    next(sampler)
    batches = max(1, store.num_rows // config.batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        next(sampler)
    seconds = time.perf_counter() - start
    sampler.close()
    return seconds * store.num_rows / (batches * config.batch_size)


def measure(label: str, store: ActivationStore, repeats: int, batch_size: int, buffer_chunks: int) -> None:
    variants = {
        "sampler default: normalised": SamplerConfig(batch_size=batch_size, buffer_chunks=buffer_chunks),
        "sampler normalised, float32": SamplerConfig(
            batch_size=batch_size, buffer_chunks=buffer_chunks, dtype="float32"
        ),
        "sampler raw values": SamplerConfig(
            batch_size=batch_size, buffer_chunks=buffer_chunks, normalization_method="none"
        ),
    }
    times: dict[str, list[float]] = {"raw sequential read": [], **{k: [] for k in variants}}
    for _ in range(repeats):
        times["raw sequential read"].append(raw_read(store))
        for name, config in variants.items():
            times[name].append(sampler_read(store, config))
    mb = store.num_rows * store.row_bytes / 1e6
    raw = statistics.median(times["raw sequential read"])
    print(f"\n{label}: {store.num_rows} rows, {mb:,.0f} MB stored, {store.num_chunks} chunks of {store.rows_per_chunk}")
    for name, values in times.items():
        t = statistics.median(values)
        print(
            f"  {name:28s} {store.num_rows / t:>10,.0f} rows/s {mb / t:>8,.0f} MB/s   "
            f"{raw / t:6.0%} of raw   (median of {len(values)}: {', '.join(f'{v:.2f}' for v in values)} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--rows-per-chunk", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--buffer-chunks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS measurement")
    args = parser.parse_args()
    torch.set_num_threads(2)
    np.random.seed(0)
    geometry = (args.rows, args.layers, args.d_model, args.rows_per_chunk)
    with tempfile.TemporaryDirectory(prefix="clt-bench-") as tmp:
        local = write_store(f"{tmp}/store", *geometry)
        measure("local disk", local, args.repeats, args.batch_size, args.buffer_chunks)
        if args.no_s3:
            return
        import os

        from infra.stack.seaweedfs import seaweedfs

        with seaweedfs(f"{tmp}/s3", "bench-key", "bench-secret-0123456789", ("acts",)) as server:
            os.environ.update(server.env())
            remote = write_store("s3://acts/bench", *geometry)
            measure("SeaweedFS S3 on loopback", remote, args.repeats, args.batch_size, args.buffer_chunks)


if __name__ == "__main__":
    main()
