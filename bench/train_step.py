"""Training-step throughput, peak memory and MFU of the CLT, sparse vs dense decoding, in one run.

    .venv/bin/python bench/train_step.py            # both shapes, each in its own process (for its peak RSS)
    .venv/bin/python bench/train_step.py --shape a  # one of them

Shapes (issue 5): (a) L=4, d=64, F=512, batchtopk k=16 global, B=512; (b) the SmolLM2 shape L=30, d=576, F=2048,
batchtopk k=32 per layer, B=1024. A step is the trainer's: forward, loss, backward, global-norm clip, AdamW, on
random normalised batches (the data path is benchmarked by bench/store_read.py). "useful FLOP/s" counts the
encoder (6·B·L·d·F for forward and backward) plus the decoder rows actually used (6·nnz·(L−s)·d), so sparse and
dense decoding are compared on the same work; MFU divides it by the float32 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt_core.model import clt as clt_module
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.losses import clt_loss
from clt_core.train.trainer import _clip_gradients

SHAPES = {
    "a": {"L": 4, "d": 64, "F": 512, "k": 16, "scope": "global", "B": 512, "steps": 40},
    "b": {"L": 30, "d": 576, "F": 2048, "k": 32, "scope": "per_layer", "B": 1024, "steps": 3},
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


def run(shape: str, dense: bool) -> dict[str, float]:
    s = SHAPES[shape]
    L, d, F, B = s["L"], s["d"], s["F"], s["B"]
    cfg = CLTConfig(num_layers=L, d_model=d, num_features=F, activation_fn="batchtopk", k=s["k"], topk_scope=s["scope"])
    model = CrossLayerTranscoder(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, L, d, generator=gen), torch.randn(B, L, d, generator=gen)
    real_decode = clt_module.decode
    if dense:
        clt_module.decode = lambda a, W, sparse, grad_mask=None: real_decode(a, W, False, grad_mask)
    times, nnz = [], 0
    try:
        for step in range(s["steps"] + 2):
            start = time.perf_counter()
            out = model(x)
            loss = clt_loss(model, out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            _clip_gradients(model, 1.0)
            optimizer.step()
            if step >= 2:  # warm-up steps excluded
                times.append(time.perf_counter() - start)
            nnz_per_source = (out.activations != 0).sum(dim=(0, 2))
    finally:
        clt_module.decode = real_decode
    nnz = sum(int(nnz_per_source[src]) * (L - src) * d for src in range(L))
    useful = 6 * B * L * d * F + 6 * nnz
    t = statistics.median(times)
    return {"step_s": t, "tokens_per_s": B / t, "useful_flops": useful / t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES))
    args = parser.parse_args()
    if args.shape is None:
        for shape in SHAPES:
            subprocess.run([sys.executable, __file__, "--shape", shape], check=True)
        return
    s = SHAPES[args.shape]
    peak32, peak16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    decoder_params = s["F"] * s["d"] * s["L"] * (s["L"] + 1) // 2
    print(
        f"shape ({args.shape}): L={s['L']} d={s['d']} F={s['F']} batchtopk k={s['k']} {s['scope']}, B={s['B']}; "
        f"decoder {decoder_params / 1e6:.1f} M parameters; {torch.get_num_threads()} threads; matmul "
        f"{peak32 / 1e9:.0f} GFLOP/s float32, {peak16 / 1e9:.0f} GFLOP/s bfloat16"
    )
    for name, dense in (("sparse decode", False), ("dense decode", True)):
        r = run(args.shape, dense)
        print(
            f"  {name:14s} {r['step_s'] * 1e3:9.1f} ms/step  {r['tokens_per_s']:>10,.0f} tokens/s  "
            f"{1 / r['step_s']:7.2f} steps/s  useful {r['useful_flops'] / 1e9:6.1f} GFLOP/s  "
            f"MFU {r['useful_flops'] / peak32:6.1%}"
        )
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
