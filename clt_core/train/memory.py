"""Peak memory of a training run per rank, estimated before the first step, and the refusal of a run that cannot fit.

The parts, for this rank's features: float32 parameters and two Adam moments; gradients (on the sparse path in the
compute dtype on the compute copy, plus one float32 scratch tensor the size of the largest decoder; on the dense path
float32 on every parameter); the compute copy itself; the step's activations; the sampler's windows (inputs and
targets of `buffer_chunks` chunks, about `prefetch_windows + 2` of them resident: read ahead, being sampled, being
filled); and the runtime (Python, torch and the libraries: measured here at ~0.7 GB).

`reuse_freed_memory` sets the allocator policy a training process runs under.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import psutil
import torch

from clt_core.errors import ConfigError
from clt_core.model.config import CLTConfig
from clt_core.train.config import TrainConfig
from clt_core.train.step import compute_dtype

RUNTIME_BYTES = 700 * 2**20
EVAL_BATCH = 1024
"""Rows a forward pass of held-out evaluation (`train/evaluation.py`)."""
"""Resident size of a training process before its model and data (interpreter, torch, zarr, numpy, pydantic)."""


def reuse_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it to the system.

    A step and the sampler allocate the same large tensors every step (windows of rows, their float32 conversions,
    the step's temporaries); glibc maps each one afresh and unmaps it when freed, so every step pays its page
    faults again: at the SmolLM2 shape the sampler alone faulted in 0.5 GB of 4 KB pages a batch, 1 s of system
    time a step on two cores. Served from the heap and kept there, they are reused already mapped. Affects
    later allocations of this process only; a no-op where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    mallopt(M_MMAP_MAX, 0)  # no allocation gets a mapping of its own ...
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # ... and the heap is not shrunk when they are freed
    mallopt(M_TOP_PAD, 2**30)  # grown a GB at a time (virtual: only pages touched count)


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer: int
    compute_copy: int
    activations: int
    data: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return (
            self.parameters + self.gradients + self.optimizer + self.compute_copy + self.activations + self.data
        ) + self.runtime

    def describe(self) -> str:
        gb = 2**30
        parts = ", ".join(
            f"{name} {value / gb:.2f}"
            for name, value in (
                ("parameters", self.parameters),
                ("gradients", self.gradients),
                ("optimiser", self.optimizer),
                ("compute copy", self.compute_copy),
                ("activations", self.activations),
                ("data", self.data),
                ("runtime", self.runtime),
            )
        )
        return f"{self.total / gb:.1f} GB ({parts} GB)"


def estimate_memory(
    model: CLTConfig,
    config: TrainConfig,
    *,
    sparse: bool,
    world_size: int = 1,
    rows_per_chunk: int = 4096,
    store_bytes: int = 2,
    data_bytes: int | None = None,
) -> MemoryEstimate:
    """Estimated peak resident memory of one rank of a run (`sparse`: whether it takes the sparse path).
    `data_bytes`: what the batches' source holds (a live source's buffers and language model) instead of the
    sampler's windows of `rows_per_chunk`-row chunks of `store_bytes` values."""
    L, d, F = model.num_layers or 1, model.d_model or 1, model.num_features // world_size
    B = config.sampler.batch_size
    encoder = L * F * d
    decoders = F * d * (L * (L + 1) // 2 if model.decoders == "cross_layer" else L)  # Σ_s targets of layer s
    biases = 2 * L * F + L * d
    params = encoder + decoders + biases
    low = 2 if compute_dtype(config) == torch.bfloat16 else 4
    if sparse:
        # + float32 scratch for the largest compute copy: the encoder (and a CLT's first decoder), F·L·d either way
        gradients = (encoder + decoders) * low + biases * 4 + F * L * d * 4
        compute_copy = (encoder + decoders) * low
        k_entries = B * (model.k * L if model.topk_scope == "per_layer" else model.k)
        # inputs copy, error/gradient buffer, its low-precision copy; one layer's float32 pre-activations with the
        # selection's temporaries (or every layer's, for a global scope); ~60 bytes per active entry
        dense_pre = (1 if model.topk_scope == "per_layer" else L) * B * F * 4 * 2
        activations = B * L * d * (low + 4 + low) + dense_pre + int(k_entries * 60)
    else:
        gradients = params * 4
        compute_copy = params * 2 if low == 2 else 0  # autocast's cached bf16 weights
        activations = B * L * F * 4 * 5 + B * L * d * 4 * 6  # pre-activations, activations, masks, their grads
    # held-out evaluation: the dense forward of 1,024 rows (pre-activations, activations, the selection's and the
    # decoder's temporaries: ~6 float32 [rows, L, F]), when it needs more than the step
    activations = max(activations, EVAL_BATCH * L * F * 4 * 6)
    window = config.sampler.buffer_chunks * rows_per_chunk * L * d * store_bytes * 2
    data = window * (config.sampler.prefetch_windows + 2) if data_bytes is None else data_bytes
    return MemoryEstimate(params * 4, gradients, params * 8, compute_copy, activations, data)


def small_step(model: CLTConfig, config: TrainConfig, world_size: int = 1) -> bool:
    """Whether a step is small enough (under 50 MFLOP of encoder work) that one CPU thread runs it as fast as two,
    leaving the other core to the sampler. With the compiled kernels a second thread pays off far below the 1 GFLOP
    this once was: at 134 MFLOP (L=4, d=64, F=512, B=512) `clt train`'s loop ran 167 steps/s on two threads against
    128–142 on one."""
    L, d, F = model.num_layers or 1, model.d_model or 1, model.num_features // world_size
    return 2 * config.sampler.batch_size * L * d * F < 5e7


def check_fits(estimate: MemoryEstimate, ranks_on_this_machine: int = 1) -> None:
    """Refuse, in one line, a run whose ranks on this machine need more memory than it has."""
    need = estimate.total * ranks_on_this_machine
    have = psutil.virtual_memory().total
    if need > have:
        who = f"{ranks_on_this_machine} ranks x " if ranks_on_this_machine > 1 else ""
        raise ConfigError(
            f"this run needs about {who}{estimate.total / 2**30:.1f} GB per rank but the machine has "
            f"{have / 2**30:.1f} GB: lower model.num_features or sampler.batch_size, use precision: bf16, or "
            "split the features over more machines (torchrun)"
        )
