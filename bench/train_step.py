"""Training throughput: the trainer's step (bare) and `clt train` end to end, with peak memory and MFU, in one run.

    .venv/bin/python bench/train_step.py                 # every shape, each in its own process (for its peak RSS)
    .venv/bin/python bench/train_step.py --shape b4096   # one of them
    .venv/bin/python bench/train_step.py --shape b4096 --profile   # + the torch.profiler breakdown of one step
    .venv/bin/python bench/train_step.py --e2e a         # `clt train` on a synthetic store of shape (a), 300 steps
    .venv/bin/python bench/train_step.py --e2e b4096 --steps 8   # `clt train` at the SmolLM2 shape (a 3 GB store)

Shapes: (a) L=4, d=64, F=512, batchtopk k=16 global, B=512; (b) the SmolLM2-135M shape L=30, d=576, F=2048,
batchtopk k=32 per layer, B=1024; (b4096) the same at B=4096. A step is `TrainStep`'s (forward, loss, backward,
global-norm clip, Adam) on random normalised bf16 batches, for each precision; `dense` is the same step on the
dense path (every pre-activation decoded), for comparison. "useful FLOP/s" counts the encoder's forward
(2·B·L·d·F), its backward on the active entries, and the decoder rows actually used (6·nnz·(L−s)·d); MFU divides it
by the bf16 matmul rate measured in the same run. The optimiser's memory traffic is 28 bytes per parameter
(float32 parameter, gradient and two moments read; parameter and moments written) plus the compute copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as clt_core/__init__.py does, before torch is imported
import torch  # noqa: E402

from clt_core.data.sampler import SamplerConfig  # noqa: E402
from clt_core.model.clt import CrossLayerTranscoder  # noqa: E402
from clt_core.model.config import CLTConfig  # noqa: E402
from clt_core.train.config import TrainConfig  # noqa: E402
from clt_core.train.memory import estimate_memory, reuse_freed_memory  # noqa: E402
from clt_core.train.step import TrainStep, uses_sparse_path  # noqa: E402

SHAPES = {
    "a": {"L": 4, "d": 64, "F": 512, "k": 16, "scope": "global", "B": 512, "steps": 40},
    "b": {"L": 30, "d": 576, "F": 2048, "k": 32, "scope": "per_layer", "B": 1024, "steps": 3},
    "demo": {"L": 30, "d": 576, "F": 256, "k": 16, "scope": "per_layer", "B": 512, "steps": 10},
    "b4096": {"L": 30, "d": 576, "F": 2048, "k": 32, "scope": "per_layer", "B": 4096, "steps": 3},
}


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def memory_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of a large in-place axpy (two reads, one write), the access pattern of an optimiser step."""
    a, b = torch.ones(64 * 2**20), torch.ones(64 * 2**20)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a.add_(b, alpha=0.5)
        times.append(time.perf_counter() - start)
    return 3 * a.numel() * 4 / statistics.median(times)


def train_config(shape: str, precision: str, dense: bool) -> TrainConfig:
    s = SHAPES[shape]
    cfg = CLTConfig(
        num_layers=s["L"], d_model=s["d"], num_features=s["F"], activation_fn="batchtopk", k=s["k"],
        topk_scope=s["scope"],
    )  # fmt: skip
    # auxk_coef > 0 with an empty dead mask costs nothing but sends the step down the dense path
    sampler = SamplerConfig(batch_size=s["B"])
    return TrainConfig(model=cfg, precision=precision, sampler=sampler, auxk_coef=1e-9 if dense else 0.0)


def model_and_step(shape: str, precision: str, dense: bool) -> tuple[CrossLayerTranscoder, TrainStep]:
    cfg = train_config(shape, precision, dense)
    model = CrossLayerTranscoder(cfg.model)
    return model, TrainStep(model, cfg, "cpu")


def run(shape: str, precision: str, dense: bool, profile: bool) -> dict[str, float]:
    reuse_freed_memory()  # the allocator policy `clt train` runs under
    s = SHAPES[shape]
    L, d, F, B = s["L"], s["d"], s["F"], s["B"]
    _model, step = model_and_step(shape, precision, dense)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, d, generator=gen).bfloat16()
    y = torch.randn(B, L, d, generator=gen).bfloat16()
    dead = torch.zeros(L, F, dtype=torch.bool)
    times = []
    for i in range(s["steps"] + 2):
        start = time.perf_counter()
        result = step(x, y, i, dead)
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(x, y, 0, dead)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    nnz = result.active.tolist()
    decoded = sum(nnz[src] * (L - src) * d for src in range(L))
    useful = 2 * B * L * d * F + 2 * sum(nnz) * d + 6 * decoded
    t = statistics.median(times)
    return {"step_s": t, "tokens_per_s": B / t, "useful_flops": useful / t}


def estimated_peak(shape: str, precision: str, dense: bool) -> float:
    """`clt train`'s estimate for this step, without the sampler's windows (the bench has no sampler)."""
    cfg = train_config(shape, precision, dense)
    estimate = estimate_memory(cfg.model, cfg, sparse=uses_sparse_path(cfg))
    return (estimate.total - estimate.data) / 2**20


def bench_precision(shape: str, precision: str, dense: bool, profile: bool) -> None:
    """One precision of one shape, in a process of its own (its peak RSS is the step's alone)."""
    s = SHAPES[shape]
    r = run(shape, precision, dense, profile)
    peak16 = matmul_flops(torch.bfloat16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    estimate = estimated_peak(shape, precision, dense)
    name = f"{'dense ' if dense else ''}{precision}"
    print(
        f"  {name:11s} {r['step_s'] * 1e3:9.1f} ms/step  {r['tokens_per_s']:>8,.0f} tokens/s  "
        f"{1 / r['step_s']:7.2f} steps/s  useful {r['useful_flops'] / 1e9:6.1f} GFLOP/s  "
        f"MFU {r['useful_flops'] / peak16:6.1%} of bf16  peak RSS {peak:,.0f} MB (estimated {estimate:,.0f} MB, "
        f"{estimate / peak - 1:+.0%})  B={s['B']}",
        flush=True,
    )


def bench_shape(shape: str, profile: bool) -> None:
    s = SHAPES[shape]
    peak32, peak16, bandwidth = matmul_flops(torch.float32), matmul_flops(torch.bfloat16), memory_bandwidth()
    L, d, F, B = s["L"], s["d"], s["F"], s["B"]
    params = L * F * d + F * d * L * (L + 1) // 2
    print(
        f"shape ({shape}): L={L} d={d} F={F} batchtopk k={s['k']} {s['scope']}, B={B}; {params / 1e6:.1f} M "
        f"parameters; {torch.get_num_threads()} threads; matmul {peak32 / 1e9:.0f} GFLOP/s float32, "
        f"{peak16 / 1e9:.0f} GFLOP/s bfloat16; memory {bandwidth / 1e9:.1f} GB/s"
    )
    encoder = 2 * B * L * d * F / peak16
    optimiser = params * (28 + 4) / bandwidth
    print(
        f"  limit at these rates: encoder forward {encoder:.2f} s (bf16 matmul) + optimiser {optimiser:.2f} s "
        f"(memory) = {B / (encoder + optimiser):,.0f} tokens/s before the sparse decoder"
    )
    for precision, dense in (("bf16", False), ("fp32", False), ("bf16", True)):
        if dense and shape != "a":
            continue  # the dense path at the SmolLM2 shape takes minutes a step (issue 13's baseline)
        args = ["--shape", shape, "--precision", precision, *(["--dense"] if dense else [])]
        args += ["--profile"] if profile and precision == "bf16" and not dense else []
        subprocess.run([sys.executable, __file__, *args], check=True)


def bench_e2e(shape: str, steps: int) -> None:
    """`clt train` as a user runs it: a fresh process, a synthetic bf16 store, metrics, evaluation, checkpoints."""
    s = SHAPES[shape]
    clt = [sys.executable, "-m", "clt_core.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        rows = max(s["B"] * min(64, steps + 4), 32768)  # the SmolLM2 shape's 69 KB rows: only what the run reads
        subprocess.run(
            [*clt, "make-synthetic", store, "--rows", str(rows), "--num-layers", str(s["L"]), "--d-model",
             str(s["d"]), "--num-features", str(s["F"]), "--dtype", "bfloat16"],
            check=True, capture_output=True,
        )  # fmt: skip
        walls = []
        for run_index in range(3):
            out = f"{tmp}/run{run_index}"
            start = time.perf_counter()
            proc = subprocess.run(
                ["/usr/bin/time", "-f", "%M", *clt, "train", "--quiet", "--data", store, "--out", out,
                 "--num-features", str(s["F"]), "--activation-fn", "batchtopk", "--k", str(s["k"]),
                 "--topk-scope", s["scope"], "--batch-size", str(s["B"]), "--training-steps", str(steps)],
                check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )  # fmt: skip
            walls.append(time.perf_counter() - start)
            peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
            lines = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
            loop_rate = [r for r in lines if "tokens_per_second" in json.dumps(r)][-1]
        wall = statistics.median(walls)
        print(
            f"clt train, shape ({shape}), {steps} steps: {wall:.1f} s wall (median of 3: "
            f"{', '.join(f'{w:.1f}' for w in walls)}), {steps / wall:.1f} steps/s and {steps * s['B'] / wall:,.0f} "
            f"tokens/s end to end, start-up included; {_find(loop_rate, 'tokens_per_second'):,.0f} tokens/s in the "
            f"loop; peak RSS {peak_mb:,.0f} MB"
        )


def _find(record: dict, key: str) -> float:
    """`key` in a metrics.jsonl record, at any depth."""
    for k, v in record.items():
        if k == key:
            return v
        if isinstance(v, dict) and (found := _find(v, key)) is not None:
            return found
    return None  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES))
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's breakdown of one step")
    parser.add_argument("--e2e", choices=list(SHAPES), help="time `clt train` end to end on this shape")
    parser.add_argument("--steps", type=int, default=300, help="steps of the end-to-end run")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="(internal) run one precision")
    parser.add_argument("--dense", action="store_true", help="(internal) with --precision: the dense path")
    args = parser.parse_args()
    if args.e2e:
        bench_e2e(args.e2e, args.steps)
    elif args.shape and args.precision:
        bench_precision(args.shape, args.precision, args.dense, args.profile)
    elif args.shape:
        bench_shape(args.shape, args.profile)
    else:
        for shape in SHAPES:
            subprocess.run([sys.executable, __file__, "--shape", shape], check=True)
        subprocess.run([sys.executable, __file__, "--e2e", "a"], check=True)


if __name__ == "__main__":
    main()
