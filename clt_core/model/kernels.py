"""Compiled CPU kernels (kernels.c): the bf16 sparse decoder's (decode, backward: one call per source layer), the
error in place, each layer's feature-major order, the Adam(W) pass over bf16 compute copies, the sampler's row
preparation, and the quantised stores' coding and decoding (data/quantize.py).

PyTorch's kernels for the decoder (embedding bags and MKL's sampled product, model/sparse.py) read every active
entry's weight row from cache at a fraction of this CPU's rate, convert each bf16 block to float32 first, and read
the loss gradient twice in backward; around them, mixed-dtype and transposing copies make fresh float32 temporaries.
kernels.c does the same arithmetic in one pass per kernel, into the caller's buffers. It is compiled on first use
with the system's C compiler (`cc`, ~1 s) for this CPU (`-march=native`) and kept in the project's cache
(clt_core/cache.py, by default `~/.cache/clt-pipeline`); without a compiler, or with `CLT_CPU_KERNELS=0`,
`available()` and `compiled_for()` are False and the PyTorch paths run.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from clt_core.cache import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]  # arithmetic as written


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, platform.machine(), platform.node()]).encode())
    target = cache_dir() / "kernels" / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: ranks may race
        built = Path(tmp) / target.name
        command = [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("the CPU kernels did not compile (%s); using PyTorch's", result.stderr.strip()[:200])
            return None
        os.replace(built, target)
    return target


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("CLT_CPU_KERNELS", "1") == "0":
        return None
    try:
        path = _build()
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.warning("the CPU kernels could not be loaded (%s); using PyTorch's", exc)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.clt_decode.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.clt_decoder_backward.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    f32, f64, i32 = ctypes.c_float, ctypes.c_double, ctypes.c_int
    lib.clt_adam.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32, f32, f64, f64, i32, f64, f64, f64, f64, i32]
    lib.clt_feature_major.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, i32]
    lib.clt_prepare_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i32]
    lib.clt_error.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.clt_quantize_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, i32, ptr, ptr, i32]
    lib.clt_dequantize_rows.argtypes = [ptr, i32, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32]
    lib.clt_entries_above.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr, ptr, i64, ctypes.c_int]
    lib.clt_entries_above.restype = i64
    return lib


def available(weights: torch.Tensor) -> bool:
    """Whether the kernels apply to decoder weights like `weights` (bf16 on the CPU) and could be built."""
    return weights.device.type == "cpu" and weights.dtype == torch.bfloat16 and _library() is not None


def compiled_for(tensor: torch.Tensor) -> bool:
    """Whether the kernels on integer operands (`feature_major`) apply to a tensor like `tensor`."""
    return tensor.device.type == "cpu" and _library() is not None


def _check(*tensors: tuple[torch.Tensor, torch.dtype]) -> None:
    for tensor, dtype in tensors:
        if tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(f"kernel operand of {tensor.dtype} {tuple(tensor.shape)}: {dtype}, contiguous expected")


def _call(name: str, *args: torch.Tensor | float | None, threads: int | None = None) -> int:
    """Kernel `name` on `args` (tensors passed by address, None as NULL), on `threads` OpenMP threads (default all of
    PyTorch's); its return value."""
    lib = _library()
    assert lib is not None
    pointers = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    return getattr(lib, name)(*pointers, threads or torch.get_num_threads())


def decode(out: torch.Tensor, W: torch.Tensor, ptr: torch.Tensor, features: torch.Tensor, values: torch.Tensor) -> None:
    """`out[t, b] += Σ_j values[j]·W[t, features[j]]` over the entries `[ptr[b], ptr[b+1])` of token b, for every
    target t: `out [T, B, d]` float32, `W [T, F, d]` bf16 (one source's blocks), `ptr [B+1]`, entries token-major."""
    T, B, d = out.shape
    _check((out, torch.float32), (W, torch.bfloat16), (ptr, torch.int64), (features, torch.int64),
           (values, torch.float32))  # fmt: skip
    if W.shape[0] != T or W.shape[2] != d or ptr.shape[0] != B + 1:
        raise ValueError(f"decode: out {tuple(out.shape)}, W {tuple(W.shape)}, ptr {tuple(ptr.shape)}")
    _call("clt_decode", out, B * d, d, W, W.shape[1] * d, T, ptr, features, values, B, d)


def decoder_backward(
    G: torch.Tensor, W: torch.Tensor, dW: torch.Tensor, ptr: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """For the entries `[ptr[f], ptr[f+1])` of feature f (feature-major): `dW[t, f] = Σ_j values[j]·G[t, tokens[j]]`
    (all of `dW` is written) and the returned `dots[j] = Σ_t G[t, tokens[j]]·W[t, f]` (float32): `G [T, B, d]` the
    loss gradient of the source's targets, `W`, `dW [T, F, d]` bf16."""
    T, F, d = W.shape
    _check((G, torch.bfloat16), (W, torch.bfloat16), (dW, torch.bfloat16), (ptr, torch.int64), (tokens, torch.int64),
           (values, torch.float32))  # fmt: skip
    if G.shape[0] != T or G.shape[2] != d or dW.shape != W.shape or ptr.shape[0] != F + 1:
        raise ValueError(f"decoder_backward: G {tuple(G.shape)}, W {tuple(W.shape)}, ptr {tuple(ptr.shape)}")
    dots = torch.empty(len(tokens), dtype=torch.float32)
    _call("clt_decoder_backward", G, G.shape[1] * d, W, dW, F * d, T, ptr, tokens, values, dots, F, d)
    return dots


def feature_major(
    features: torch.Tensor, tokens: torch.Tensor, ptr: torch.Tensor, num_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of each layer (`[ptr[l], ptr[l+1])`, token-major) in feature-major order: (`order [nnz]`, each
    entry's position within its layer, stable; the tokens in that order; `bounds [L, F+1]`, CSR pointers by feature
    per layer)."""
    _check((features, torch.int64), (tokens, torch.int64), (ptr, torch.int64))
    L = len(ptr) - 1
    order, by_feature = torch.empty_like(features), torch.empty_like(tokens)
    bounds = torch.empty(L, num_features + 1, dtype=torch.int64)
    _call("clt_feature_major", features, tokens, ptr, L, num_features, order, by_feature, bounds)
    return order, by_feature, bounds


def prepare_rows(
    rows: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    positions: torch.Tensor,
    bad: torch.Tensor,
) -> None:
    """`out[positions[i]] = rows[i]·scale + bias` (float32 arithmetic, bf16 result; a copy when `scale` is None) for
    bf16 `rows [n, ...]` and `out [m, ...]` of the same row shape, `scale`, `bias` float32 of that row shape; sets
    `bad[i]` (bool `[n]`) where row i holds NaN/Inf. On the calling thread alone (the sampler's readers are threads
    already)."""
    n = rows.shape[0]
    _check((rows, torch.bfloat16), (out, torch.bfloat16), (positions, torch.int64), (bad, torch.bool))
    if scale is not None and bias is not None:
        _check((scale, torch.float32), (bias, torch.float32))
    length = rows[0].numel() if n else 0
    shapes_ok = out.shape[1:] == rows.shape[1:] and positions.shape == (n,) and bad.shape == (n,)
    if not shapes_ok or (scale is not None and (scale.numel() != length or bias is None or bias.numel() != length)):
        raise ValueError(f"prepare_rows: rows {tuple(rows.shape)}, out {tuple(out.shape)}, {len(positions)} positions")
    _call("clt_prepare_rows", rows, n, length, scale, bias, out, positions, bad, threads=1)


QUANT_KINDS = {"int8": (0, torch.int8), "fp8": (1, torch.uint8)}
"""Quantisation -> (the kernels' code kind, torch dtype of the codes: fp8 e4m3fn as its uint8 bits)."""


def quantize_rows(
    rows: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor, kind: str, codes: torch.Tensor, scale: torch.Tensor
) -> None:
    """Code bf16 `rows [n, L, d]` into `codes [n, L, d]` (int8, or uint8 fp8 bits) and `scale [n, L]` float32, with
    the reference `centre`, `spread` float32 `[L, d]` (data/quantize.py has the arithmetic). On the calling thread."""
    n, L, d = rows.shape
    number, code_dtype = QUANT_KINDS[kind]
    _check((rows, torch.bfloat16), (centre, torch.float32), (spread, torch.float32), (codes, code_dtype),
           (scale, torch.float32))  # fmt: skip
    if centre.shape != (L, d) or spread.shape != (L, d) or codes.shape != rows.shape or scale.shape != (n, L):
        raise ValueError(
            f"quantize_rows: rows {tuple(rows.shape)}, codes {tuple(codes.shape)}, scale {tuple(scale.shape)}"
        )
    _call("clt_quantize_rows", rows, n, L, d, centre, spread, number, codes, scale, threads=1)


def dequantize_rows(
    codes: torch.Tensor,
    kind: str,
    scale: torch.Tensor,
    centre: torch.Tensor,
    spread: torch.Tensor,
    out: torch.Tensor,
    *,
    norm_scale: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    bad: torch.Tensor | None = None,
) -> None:
    """`out[positions[i]] = bf16(((codes[i]·scale[i]) · spread + centre)`, then `·norm_scale + norm_bias` rounded to
    bf16 again when given (as `prepare_rows` normalises): `codes [n, L, d]` (int8, or uint8 fp8 bits), `scale [n, L]`,
    `centre`, `spread`, `norm_*` float32 `[L, d]`, `out [m, L, d]` bf16 (row i to row i without `positions`); sets
    `bad[i]` (bool `[n]`) where the dequantised row holds NaN/Inf. On the calling thread."""
    n, L, d = codes.shape
    number, code_dtype = QUANT_KINDS[kind]
    _check((codes, code_dtype), (scale, torch.float32), (centre, torch.float32), (spread, torch.float32),
           (out, torch.bfloat16))  # fmt: skip
    for t, dtype in ((norm_scale, torch.float32), (norm_bias, torch.float32), (positions, torch.int64),
                     (bad, torch.bool)):  # fmt: skip
        if t is not None:
            _check((t, dtype))
    ok = scale.shape == (n, L) and centre.shape == spread.shape == (L, d) and out.shape[1:] == (L, d)
    ok &= (norm_scale is None) == (norm_bias is None)
    ok &= norm_scale is None or (norm_scale.numel() == L * d and norm_bias is not None and norm_bias.numel() == L * d)
    ok &= (positions is None and out.shape[0] >= n) or (positions is not None and positions.shape == (n,))
    ok &= bad is None or bad.shape == (n,)
    if not ok:
        raise ValueError(
            f"dequantize_rows: codes {tuple(codes.shape)}, scale {tuple(scale.shape)}, out {tuple(out.shape)}"
        )
    _call("clt_dequantize_rows", codes, number, scale, n, L, d, centre, spread, norm_scale, norm_bias, out, positions,
          bad, threads=1)  # fmt: skip


def error(out: torch.Tensor, targets: torch.Tensor, b_dec: torch.Tensor) -> None:
    """`out [L, B, d] += b_dec[:, None] - targets.transpose(0, 1)`: the reconstruction becomes the error in place,
    from `targets [B, L, d]` bf16 as batches come (no float32 or layer-major copy of them); `b_dec [L, d]` float32."""
    L, B, d = out.shape
    _check((out, torch.float32), (targets, torch.bfloat16), (b_dec, torch.float32))
    if targets.shape != (B, L, d) or b_dec.shape != (L, d):
        raise ValueError(f"error: out {tuple(out.shape)}, targets {tuple(targets.shape)}, b_dec {tuple(b_dec.shape)}")
    _call("clt_error", out, targets, b_dec, L, B, d)


def adam(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    copy: torch.Tensor,
    *,
    swapped: bool,
    grad_scale: float,
    lr: float,
    weight_decay: float,
    decoupled: bool,
    betas: tuple[float, float],
    eps: float,
    step: float,
) -> None:
    """One Adam(W) update of `param` and its moments (float32) from `grad`, the bf16 gradient of its compute copy
    `copy`, which is rewritten from the updated parameter; `swapped`: `copy` is `param` with its first two dims
    swapped. `step` counts this update (1 for the first)."""
    _check((param, torch.float32), (exp_avg, torch.float32), (exp_avg_sq, torch.float32), (grad, torch.bfloat16),
           (copy, torch.bfloat16))  # fmt: skip
    expected = (param.shape[1], param.shape[0], *param.shape[2:]) if swapped else param.shape
    if not exp_avg.shape == exp_avg_sq.shape == param.shape or not grad.shape == copy.shape == expected:
        raise ValueError(f"adam: param {tuple(param.shape)}, grad {tuple(grad.shape)}, copy {tuple(copy.shape)}")
    d = param.shape[-1]
    _call("clt_adam", param, exp_avg, exp_avg_sq, grad, copy, param.numel() // d, d, param.shape[0], int(swapped),
          grad_scale, lr, weight_decay, int(decoupled), betas[0], betas[1], eps, step)  # fmt: skip


def entries_above(
    low: torch.Tensor, bias: torch.Tensor, floor: float, capacity: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat positions (ascending) and float32 values of the entries of `low.float() + bias` (`low [B, F]` bf16,
    `bias [F]` float32) at or above `floor`, without forming that float32 matrix; None when there are more than
    `capacity` (the floor was too low to be worth it)."""
    B, F = low.shape
    _check((low, torch.bfloat16), (bias, torch.float32))
    if bias.shape != (F,):
        raise ValueError(f"entries_above: low {tuple(low.shape)}, bias {tuple(bias.shape)}")
    positions = torch.empty(capacity, dtype=torch.int64)
    values = torch.empty(capacity, dtype=torch.float32)
    found = _call("clt_entries_above", low, bias, B, F, floor, positions, values, capacity)
    return None if found > capacity else (positions[:found], values[:found])
