"""Training from a live model against extract-then-train, end to end, on the same tokens, side by side in one run.

    .venv/bin/python bench/live.py [--tokens 65536 --held-out 8192 --num-features 2048 --k 32 --batch-size 4096]

"extract + train" is `clt extract --tokens TOKENS+HELD_OUT` into a store (its last HELD_OUT rows held out), then
`clt train --data STORE` on its first TOKENS rows; "live" is `clt train --model M --text T --tokens TOKENS` with no
held-out rows of its own, so both train on exactly rows [0, TOKENS) of the corpus (in different orders). Both models
are then evaluated on the store's held-out rows [TOKENS, TOKENS+HELD_OUT), each behind its own normalisation.
Wall times are of the whole commands (start-up, model loading, logging included); tokens/s = TOKENS / wall time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_core.data.sampler import SamplerConfig
from clt_core.data.store import ActivationStore
from clt_core.model.directory import load
from clt_core.train.evaluation import evaluate_holdout


def run(args: list[str]) -> float:
    """Seconds one `clt` command takes; a training run's checkpoints (GBs at this size) deleted after it."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clt_core.cli", *args], check=True)
    seconds = time.perf_counter() - started
    if args[0] == "train":
        shutil.rmtree(Path(args[args.index("--out") + 1]) / "checkpoints", ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="packaged:kjv")
    parser.add_argument("--tokens", type=int, default=65536, help="training rows (a multiple of the store's chunks)")
    parser.add_argument("--held-out", type=int, default=8192)
    parser.add_argument("--num-features", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--shuffle-rows", type=int, default=16384)
    parser.add_argument("--dir", help="working directory (default: a temporary one)")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="clt-bench-live-")
    root = Path(args.dir or tmp.name)
    store = str(root / "store")
    total = args.tokens + args.held_out
    steps = args.tokens // args.batch_size
    model = ["--num-features", str(args.num_features), "--activation-fn", "batchtopk", "--k", str(args.k)]
    common = [*model, "--batch-size", str(args.batch_size), "--log-interval", "1", "--eval-interval", str(10**6),
              "--checkpoint-interval", str(10**6), "--quiet"]  # fmt: skip

    extract_s = run(["extract", "--model", args.model, "--text", args.text, "--tokens", str(total), "--out", store,
                     "--quiet"])  # fmt: skip
    held = ActivationStore.open(store)
    fraction = args.held_out / total
    train_s = run(["train", "--data", store, "--out", str(root / "stored"), "--training-steps", str(steps),
                   "--holdout-fraction", f"{fraction:.12f}", *common])  # fmt: skip
    live_s = run(["train", "--model", args.model, "--text", args.text, "--tokens", str(args.tokens),
                  "--held-out-tokens", "0", "--shuffle-rows", str(args.shuffle_rows), "--out", str(root / "live"),
                  *common])  # fmt: skip

    rows = (args.tokens, total)
    print(f"\n{args.model}, {args.text}: {args.tokens:,} training tokens, F={args.num_features}, k={args.k}, "
          f"B={args.batch_size} ({steps} steps); held-out rows {rows[0]:,}..{rows[1]:,} of the store")  # fmt: skip
    print(f"{'':24} {'wall s':>8} {'tokens/s':>9} {'held-out NMSE':>14} {'L0':>7}")
    for name, seconds, run_dir in (
        ("extract + train", extract_s + train_s, "stored"),
        ("  of which extract", extract_s, None),
        ("  of which train", train_s, None),
        ("live", live_s, "live"),
    ):
        line = f"{name:24} {seconds:8.1f} {args.tokens / seconds:9,.0f}"
        if run_dir is not None:
            trained = load(root / run_dir / "final")
            metrics = evaluate_holdout(
                trained.model, held, SamplerConfig(batch_size=1024), args.held_out, rows=rows,
                normalizer=trained.normalizer,
            )  # fmt: skip
            line += f" {metrics['mean_nmse']:14.4f} {metrics['total_l0']:7.1f}"
        print(line)
    print(f"live / (extract + train) wall time: {live_s / (extract_s + train_s):.2f}")


if __name__ == "__main__":
    main()
