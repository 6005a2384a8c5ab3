"""Decoding one source layer's activations `a [B, F]` through its decoder `W [F, M]` (M = targets·d).

Dense: `a @ W`. Sparse: the active entries as a CSR matrix times W, so only the active features' decoder rows
are read; the backward gives W's gradient as Aᵀ·g (only active rows are touched) and the activations' gradient
sampled at the active positions only (`sampled_addmm`), never forming the dense `g·Wᵀ`. Entries that are zero but
still need a gradient (JumpReLU values just below their threshold, whose threshold gradient flows through them)
are kept in the pattern as explicit zeros via `grad_mask`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, W: torch.Tensor, batch: int
    ) -> torch.Tensor:
        crow = torch.zeros(batch + 1, dtype=torch.int64, device=W.device)
        crow[1:] = torch.bincount(rows, minlength=batch).cumsum(0)
        A = torch.sparse_csr_tensor(crow, cols, values.to(W.dtype), (batch, W.shape[0]), check_invariants=False)
        ctx.save_for_backward(rows, cols, values, W)
        ctx.A = A
        return A @ W

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, None]:
        rows, cols, values, W = ctx.saved_tensors
        A = ctx.A
        grad = grad.to(W.dtype).contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.sparse.sampled_addmm(A, grad, W.t(), beta=0.0).values().to(values.dtype)
        if ctx.needs_input_grad[3]:
            order = torch.argsort(cols, stable=True)
            crow = torch.zeros(W.shape[0] + 1, dtype=torch.int64, device=W.device)
            crow[1:] = torch.bincount(cols, minlength=W.shape[0]).cumsum(0)
            At = torch.sparse_csr_tensor(
                crow, rows[order], A.values()[order], (W.shape[0], A.shape[0]), check_invariants=False
            )
            grad_W = At @ grad
        return grad_values, None, None, grad_W, None


def decode(a: torch.Tensor, W: torch.Tensor, sparse: bool, grad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`a [B, F] @ W [F, M]`, densely or from the active entries (and those in `grad_mask`) only."""
    if not sparse:
        return a @ W if torch.is_autocast_enabled(a.device.type) else a.to(W.dtype) @ W
    pattern = a != 0 if grad_mask is None else (a != 0) | grad_mask
    rows, cols = pattern.nonzero(as_tuple=True)
    with torch.autocast(a.device.type, enabled=False):  # sparse CSR products have no bf16 kernels on CPU
        return _SparseDecode.apply(a[rows, cols], rows, cols, W, a.shape[0])
