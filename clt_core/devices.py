"""Where the heavy work runs: one reading of a `device` setting for every stage."""

from __future__ import annotations

import torch

from clt_core.errors import ConfigError


def resolve_device(spec: str) -> str:
    """`auto` -> `cuda` when available, else `cpu`; an explicit CUDA device must exist."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but CUDA is not available here; use --device cpu")
    return spec
