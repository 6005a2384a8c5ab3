"""Adam(W) over float32 parameters whose gradients may sit on a compute copy (bf16 weights, float32 masters).

The sparse forward pass (model/sparse.py) runs on `ComputeWeights`, a copy of the encoder and decoders in the compute
dtype; backward leaves their gradients on that copy, in its dtype and layout. `MixedAdam` converts each one to a
float32 gradient of its parameter's layout, one tensor at a time (so no second full set of float32 gradients is ever
held), applies PyTorch's fused Adam kernel to the parameter and its float32 moments, and copies the updated
parameter back into the compute copy; for bf16 copies on the CPU one compiled pass (model/kernels.c) does all three,
with the same arithmetic. The state is PyTorch's own (`step`, `exp_avg`, `exp_avg_sq` per parameter),
so checkpoints do not change; with float32 gradients on the parameters the updates equal `torch.optim.AdamW(fused=True)`
bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.optim.adam import adam

from clt_core.model import kernels
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.sparse import ComputeWeights


class MixedAdam:
    """Adam(W) with PyTorch's `param_groups` and `state` (not a `torch.optim.Optimizer`: constructing one imports
    torch._dynamo, a second of every run's start-up)."""

    def __init__(
        self,
        model: CrossLayerTranscoder,
        weights: ComputeWeights | None,
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float = 0.0,
        decoupled: bool = True,
        eps: float = 1e-8,
    ) -> None:
        group = {"params": list(model.parameters()), "lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps}
        self.param_groups: list[dict[str, Any]] = [group]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.decoupled = decoupled
        self._scratch: torch.Tensor | None = None
        self.weights = weights
        # parameter -> (index of its compute copy in weights.tensors(), whether the copy swaps the first two dims)
        self.copies: dict[torch.Tensor, tuple[int, bool]] = {}
        if weights is not None:
            self.copies[model.W_enc] = (0, False)
            self.copies.update({w: (1 + s, True) for s, w in enumerate(model.W_dec)})

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        copy = self.copies.get(p)
        return p.grad if copy is None or self.weights is None else self.weights.grad(copy[0])

    def gradients(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, its gradient as computed: on the parameter, or on its compute copy)."""
        for group in self.param_groups:
            for p in group["params"]:
                grad = self._grad(p)
                if grad is not None:
                    yield p, grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        if self.weights is not None:
            self.weights.zero_grad()

    def _float_grad(self, p: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
        copy = self.copies.get(p)
        if copy is not None:  # converted into one scratch buffer, reused for every tensor and step
            if self._scratch is None or self._scratch.device != p.device:
                size = max(q.numel() for q in self.copies)
                self._scratch = torch.empty(size, dtype=torch.float32, device=p.device)
            out = self._scratch[: p.numel()].view_as(p)
            out.copy_(grad.transpose(0, 1) if copy[1] else grad)
            grad = out
        return grad.mul_(scale) if scale != 1 else grad

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> None:
        """One update; every gradient is multiplied by `grad_scale` first (gradient clipping)."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                copy = self.copies.get(p)
                grad = self._grad(p)
                if grad is None:
                    continue
                state = self.state.setdefault(p, {})
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:  # loaded from a checkpoint on the CPU
                    state["step"] = state["step"].to(p.device)
                target = self.weights.tensors()[copy[0]] if copy is not None and self.weights is not None else None
                if copy is not None and target is not None and kernels.available(target) and grad.is_contiguous():
                    state["step"] += 1  # as PyTorch's Adam counts, before the update
                    kernels.adam(
                        p, state["exp_avg"], state["exp_avg_sq"], grad, target, swapped=copy[1], grad_scale=grad_scale,
                        lr=group["lr"], weight_decay=group["weight_decay"], decoupled=self.decoupled,
                        betas=(beta1, beta2), eps=group["eps"], step=float(state["step"]),
                    )  # fmt: skip
                    continue
                adam(
                    [p],
                    [self._float_grad(p, grad, grad_scale)],
                    [state["exp_avg"]],
                    [state["exp_avg_sq"]],
                    [],
                    [state["step"]],
                    fused=p.device.type in ("cpu", "cuda"),
                    decoupled_weight_decay=self.decoupled,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                )
                if copy is not None and target is not None:
                    target.copy_(p.transpose(0, 1) if copy[1] else p)
