"""Feature parallelism: each rank holds a contiguous slice of every layer's features.

The model calls only the two collectives its math needs, through `FeatureShards`: a sum of the ranks' partial
reconstructions (each rank decodes its own features) and a gather of top-k candidates (so the selected set is the
single-process one). With one rank both are the identity and nothing is imported from torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class FeatureShards:
    """Rank `rank` of `world_size` holds features [lo, hi) of every layer; `group` is their process group."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def bounds(self, num_features: int) -> tuple[int, int]:
        """This rank's feature range: contiguous and as even as possible."""
        lo = self.rank * num_features // self.world_size
        return lo, (self.rank + 1) * num_features // self.world_size

    def sum_partials(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a partial result computed from local features; the gradient passes through unchanged,
        since every rank's loss sees the same sum."""
        if self.world_size == 1:
            return x
        return _SumPartials.apply(x, self.group)

    def all_gather_cat(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim` (no gradient)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def all_reduce(self, x: torch.Tensor, op: Any = None) -> torch.Tensor:
        """In-place sum (or `op`) over ranks of a tensor that needs no gradient (metrics, norms)."""
        if self.world_size > 1:
            dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=self.group)
        return x


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None
