"""Learning-rate and sparsity-weight schedules: pure functions of the step."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear_final20":
        return 1.0 if progress < 0.8 else (1.0 - progress) / 0.2
    raise ValueError(f"unknown lr_scheduler {kind!r}")


def sparsity_factor(step: int, warmup: int) -> float:
    """λ(t)/λ: a linear ramp from 0 over `warmup` steps."""
    return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)
