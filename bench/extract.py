"""Extraction throughput next to the bare forward pass of the same model on the same batches, in one run.

    .venv/bin/python bench/extract.py [--model smollm2-135m --batches 12 --batch-size 8 --context-size 128]

"bare forward" runs `model(input_ids)` under inference_mode (LM head included, as a user's forward would);
"capture" is the nnsight trace that reads every MLP input and output and stops after the last one; "extract" is
the whole `clt extract` loop on those batches: capture, row selection, conversion and the background writer.
Each figure is the median over `--repeats` alternating rounds. Goal (issue 4): extract <= 1.15x bare forward.
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

from clt_core.data.norm_stats import NormStatsAccumulator
from clt_core.data.store import ActivationStore
from clt_core.extract.extractor import COMPUTE_DTYPES
from clt_core.extract.writer import BackgroundWriter
from clt_core.lm.capture import NNsightCapture, capture_points
from clt_core.lm.corpora import TextConfig
from clt_core.lm.loading import resolve_model
from clt_core.lm.windows import iter_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="packaged:kjv")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--compute-dtype", default="bfloat16", choices=list(COMPUTE_DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default="zstd", choices=["zstd", "none"])
    args = parser.parse_args()

    loaded = resolve_model(args.model, dtype=COMPUTE_DTYPES[args.compute_dtype])
    model = loaded.model
    points = capture_points(model)
    text = TextConfig(source=args.text, bos_token="<|endoftext|>" if args.model == "smollm2-135m" else None)
    windows = iter_windows(text, loaded.tokenizer, args.context_size)
    batches = []
    for _ in range(args.batches):
        group = [next(windows) for _ in range(args.batch_size)]
        ids = torch.from_numpy(np.stack([w.token_ids for w in group]))
        batches.append((ids, torch.from_numpy(np.stack([w.keep for w in group]))))
    capture = NNsightCapture(model, points)
    tokens = sum(int(keep.sum()) for _, keep in batches)
    tmp = tempfile.TemporaryDirectory(prefix="clt-bench-extract-")

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for ids, _ in batches:
                model(ids)
        return time.perf_counter() - start

    def captured() -> float:
        start = time.perf_counter()
        for ids, _ in batches:
            capture(ids)
        return time.perf_counter() - start

    def extracted() -> float:
        store = ActivationStore.create(
            f"{tmp.name}/store",
            num_layers=loaded.num_layers,
            d_model=loaded.d_model,
            compression=args.compression,
            overwrite=True,
        )
        start = time.perf_counter()
        writer = BackgroundWriter(store.writer(), NormStatsAccumulator(store.num_layers, store.d_model))
        for ids, keep in batches:
            inputs, targets = capture(ids)
            writer.put(inputs[keep], targets[keep], ids[keep])
        writer.close()
        return time.perf_counter() - start

    bare()  # warm-up
    runs: dict[str, list[float]] = {"bare forward": [], "capture (nnsight)": [], "extract (capture + write)": []}
    for _ in range(args.repeats):
        runs["bare forward"].append(bare())
        runs["capture (nnsight)"].append(captured())
        runs["extract (capture + write)"].append(extracted())
    base = statistics.median(runs["bare forward"])
    print(
        f"{loaded.name}: {args.batches} batches of {args.batch_size}x{args.context_size} tokens "
        f"({tokens:,} rows), compute {args.compute_dtype}, {torch.get_num_threads()} threads, "
        f"compression {args.compression}"
    )
    for name, values in runs.items():
        t = statistics.median(values)
        print(
            f"  {name:26s} {tokens / t:>8,.0f} tokens/s   {t / base:5.2f}x bare   "
            f"(median of {len(values)}: {', '.join(f'{v:.2f}' for v in values)} s)"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
