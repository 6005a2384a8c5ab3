"""Quantised storage of activation stores (storage dtypes `int8` and `fp8`; docs/formats.md).

A value x of row r, layer l, dimension i is stored as a one-byte code q with a float32 scale s per row and layer:

    z = (x - centre[l, i]) / spread[l, i]        standardised by the store's reference (float32)
    s = max_i |z| / QMAX                         QMAX = 127 (int8) or 448 (fp8 e4m3fn, its largest value)
    q = round(z / s)                             int8: to nearest even, within ±127; fp8: e4m3fn, to nearest even
    x' = bf16(((q · s) · spread) + centre)       what every reader gets back (each step rounded in float32)

The reference (`QuantReference`: the mean and floored standard deviation per layer and dimension of the store's
first `REFERENCE_ROWS` rows) takes the per-dimension outliers of real activations (a few dimensions 100x the rest)
out of the absmax, which otherwise costs the other dimensions their precision: on real SmolLM2-135M rows int8 with
an absmax per row and layer alone has an NMSE of ~1e-3, after the standardisation ~6e-5. Values are quantised from
their bfloat16 rounding, so a store quantised at extraction and one converted from a bfloat16 store hold the same
codes for the same rows and reference. A row and layer holding NaN or Inf gets scale NaN (and codes 0): it reads
back as NaN, so readers find and skip or refuse it as in any other store.

One reference per store, written once before any row (`ensure_reference`): the shards of a parallel extraction and a
resumed one all use the stored reference; its writer holds the lease `quantization-reference`, so two writers never
race to write different ones. The reference is one array whose attribute `sha256` (written first) is the digest of
its values: a reader that finds them missing or different sees no reference (a writer is still writing it or died).

The coding and decoding run in compiled kernels (model/kernels.c) where they are available, else in PyTorch, with the
same values bit for bit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from clt_core.data.norm_stats import RunningMoments, finite_rows
from clt_core.errors import StoreError
from clt_core.model import kernels

if TYPE_CHECKING:
    from clt_core.data.store import ActivationStore

QMAX = {"int8": 127.0, "fp8": 448.0}
"""Largest code magnitude: the absmax of a row and layer maps to it."""
CODE_DTYPES = {"int8": torch.int8, "fp8": torch.uint8}
"""Torch dtype of the stored codes (fp8 e4m3fn as its bits)."""
REFERENCE_ROWS = 1024
"""Rows (the store's first) the reference is computed from."""
SPREAD_FLOOR = 1e-3
"""A dimension's spread is at least this fraction of its layer's mean spread (1 where a layer is constant)."""
REFERENCE_LEASE = "quantization-reference"
REFERENCE_ORDER = ("inputs_centre", "inputs_spread", "targets_centre", "targets_spread")
"""The order of the reference's `[4, L, d]` array."""


@dataclass(frozen=True)
class QuantReference:
    """A store's quantisation reference: float32 `[L, d]` centre and spread of inputs and of targets."""

    inputs_centre: np.ndarray
    inputs_spread: np.ndarray
    targets_centre: np.ndarray
    targets_spread: np.ndarray
    rows: int = 0
    """Rows it was computed from."""

    def as_array(self) -> np.ndarray:
        return np.stack([np.asarray(getattr(self, name), dtype="<f4") for name in REFERENCE_ORDER])

    @classmethod
    def from_array(cls, values: np.ndarray, rows: int = 0) -> QuantReference:
        parts = {name: np.ascontiguousarray(values[i], dtype=np.float32) for i, name in enumerate(REFERENCE_ORDER)}
        return cls(**parts, rows=rows)

    def digest(self) -> str:
        return digest(self.as_array())

    def tensors(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre, spread) of `inputs` or `targets` as float32 tensors (sharing memory)."""
        return torch.from_numpy(getattr(self, f"{kind}_centre")), torch.from_numpy(getattr(self, f"{kind}_spread"))


def digest(values: np.ndarray) -> str:
    """sha256 of the reference's values (little-endian float32)."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def reference_from_rows(inputs: torch.Tensor, targets: torch.Tensor) -> QuantReference:
    """The reference of rows `[n, L, d]` (the store's first rows, in bfloat16): mean and population std per layer and
    dimension in float64 over the rows that hold no NaN/Inf, the std floored (`SPREAD_FLOOR`), both as float32."""
    keep = finite_rows(inputs, targets)
    parts: dict[str, np.ndarray] = {}
    for kind, rows in (("inputs", inputs), ("targets", targets)):
        moments = RunningMoments.of(rows[keep])
        std = moments.std
        floor = SPREAD_FLOOR * std.mean(axis=1, keepdims=True)
        spread = np.maximum(std, floor)
        spread[spread <= 0] = 1.0
        parts[f"{kind}_centre"] = moments.mean.astype(np.float32)
        parts[f"{kind}_spread"] = spread.astype(np.float32)
    return QuantReference(**parts, rows=int(keep.sum()))


# ---------------------------------------------------------------------------------------------------- coding
def quantize(
    rows: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor, kind: str, *, compiled: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Codes `[n, L, d]` (int8, or uint8 fp8 bits) and float32 scales `[n, L]` of bfloat16 rows `[n, L, d]`.
    `compiled`: force (True) or forbid (False) the compiled kernel; default where it is available."""
    rows = rows.to(torch.bfloat16).contiguous()
    n, L, _ = rows.shape
    if compiled is None:
        compiled = kernels.compiled_for(rows)
    if compiled and n:
        codes = torch.empty(rows.shape, dtype=CODE_DTYPES[kind])
        scale = torch.empty(n, L, dtype=torch.float32)
        kernels.quantize_rows(rows, centre, spread, kind, codes, scale)
        return codes.numpy(), scale.numpy()
    return _quantize_torch(rows, centre, spread, kind)


def _quantize_torch(
    rows: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    z = rows.to(torch.float32).sub_(centre).div_(spread)
    amax = z.abs().amax(dim=-1) if z.shape[-1] else torch.zeros(z.shape[:-1])
    ok = torch.isfinite(amax)
    scale = torch.from_numpy(amax.numpy() / np.float32(QMAX[kind]))  # exact float32 division
    divisor = torch.where(ok & (scale > 0), scale, torch.ones_like(scale))
    v = z.div_(divisor[..., None])
    if kind == "int8":
        codes = v.round_().clamp_(-127, 127).to(torch.int8)
    else:
        codes = v.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    codes[~ok] = 0
    scale[~ok] = float("nan")
    return codes.numpy(), scale.numpy()


def dequantize(
    codes: np.ndarray,
    scale: np.ndarray,
    centre: torch.Tensor,
    spread: torch.Tensor,
    kind: str,
    *,
    compiled: bool | None = None,
) -> torch.Tensor:
    """bfloat16 rows `[n, L, d]` of codes and scales (the module docstring's x')."""
    q = torch.from_numpy(np.ascontiguousarray(codes))
    s = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))
    if compiled is None:
        compiled = kernels.compiled_for(q)
    if compiled:
        out = torch.empty(q.shape, dtype=torch.bfloat16)
        kernels.dequantize_rows(q, kind, s, centre, spread, out)
        return out
    return dequantize_torch(q, s, centre, spread, kind)


def dequantize_torch(
    codes: torch.Tensor, scale: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor, kind: str
) -> torch.Tensor:
    """`dequantize` in PyTorch (where the kernels are unavailable)."""
    values = codes.to(torch.float32) if kind == "int8" else codes.view(torch.float8_e4m3fn).to(torch.float32)
    return values.mul_(scale[..., None]).mul_(spread).add_(centre).to(torch.bfloat16)


def nmse(stored: torch.Tensor, exact: torch.Tensor) -> float:
    """Σ (stored - exact)² / Σ (exact - mean)², in float64 over all values, the mean per layer and dimension."""
    x = exact.to(torch.float64)
    err = (stored.to(torch.float64) - x).square().sum()
    return float(err / (x - x.mean(dim=0)).square().sum())


# ------------------------------------------------------------------------------------------------- reference
def ensure_reference(
    store: ActivationStore, compute: Callable[[], QuantReference], *, wait_s: float = 900.0
) -> QuantReference:
    """The store's reference; if it has none yet, `compute()` it and write it. Exactly one writer ever writes it: it
    holds the lease `quantization-reference` and looks again once it holds it; the others wait for it (at most
    `wait_s`) and use what it wrote."""
    from clt_core.data.lease import LeaseHeld, StoreLease

    deadline = time.monotonic() + wait_s
    while True:
        reference = store.load_reference()
        if reference is not None:
            return reference
        try:
            with StoreLease(store.url, REFERENCE_LEASE, what="a writer computing the quantisation reference"):
                reference = store.load_reference()
                if reference is None:
                    reference = compute()
                    store.write_reference(reference)
                return reference
        except LeaseHeld as held:
            if time.monotonic() > deadline:
                raise StoreError(f"waited {wait_s:.0f} s for the quantisation reference: {held}") from None
            time.sleep(0.5)
