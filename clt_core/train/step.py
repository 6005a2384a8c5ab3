"""One optimiser step: forward, loss, backward, global-norm clipping, Adam(W) — on the sparse path where it applies.

topk/batchtopk runs trained on the reconstruction loss alone take the sparse path (model/sparse.py): encoder and
decoders in the compute dtype (`precision`), only active entries decoded, float32 master weights in `MixedAdam`.
Every other run (jumprelu, relu, or loss terms that need every pre-activation: sparsity, pre-activation, AuxK) takes
the dense path, autocast to bf16 when asked.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.losses import LossTerms, clt_loss
from clt_core.train.config import TrainConfig
from clt_core.train.optim import MixedAdam
from clt_core.train.schedules import sparsity_factor


class StepResult(NamedTuple):
    terms: LossTerms
    active: torch.Tensor
    """Active entries of this rank's features per layer, summed over the batch, `[L]` float64."""
    fired: torch.Tensor
    """Whether each of this rank's features fired in the batch, `[L, F_local]`."""
    grad_norm: float
    """Global gradient norm before clipping."""


def uses_sparse_path(config: TrainConfig) -> bool:
    """Whether training takes the sparse path (see the module docstring)."""
    extra_terms = config.sparsity_lambda > 0 or config.preactivation_coef > 0 or config.auxk_coef > 0
    return config.model.activation_fn in ("batchtopk", "topk") and not extra_terms


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype of the step's matmuls: `precision`, with `auto` resolved (see TrainConfig.precision)."""
    if config.precision == "auto":
        return torch.bfloat16 if uses_sparse_path(config) else torch.float32
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


class TrainStep:
    """The trainer's step for `model` under `config`; owns the optimiser (and the compute copy of the weights)."""

    def __init__(self, model: CrossLayerTranscoder, config: TrainConfig, device: str) -> None:
        self.model, self.config = model, config
        self.sparse = uses_sparse_path(config)
        self.dtype = compute_dtype(config)
        self.weights = model.compute_weights(self.dtype) if self.sparse else None
        adamw = config.optimizer == "adamw"
        self.optimizer = MixedAdam(
            model,
            self.weights,
            lr=config.learning_rate,
            betas=config.betas,
            weight_decay=config.weight_decay if adamw else 0.0,
            decoupled=adamw,
        )
        bf16_dense = not self.sparse and self.dtype == torch.bfloat16
        self.autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16_dense)

    def weights_loaded(self) -> None:
        """Call after the model's parameters were overwritten (resume): the compute copy follows them."""
        if self.weights is not None:
            self.weights.refresh(self.model)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, dead: torch.Tensor) -> StepResult:
        """One step on normalised inputs and targets `[B, L, d]` (any float dtype); `dead [L, F_local]` marks the
        features AuxK may use."""
        model, cfg = self.model, self.config
        if self.weights is not None:  # the sparse path
            per_layer, acts = model.sparse_loss(x, y, self.weights)
            loss = per_layer.sum()
            zero = torch.zeros((), device=loss.device)
            terms = LossTerms(loss, loss, zero, zero, zero)
            active = acts.counts_per_layer().to(loss.device)
            fired = acts.fired(model.num_local_features)
        else:
            with self.autocast:
                dense = model(x.float())
            terms = clt_loss(
                model,
                dense,
                y.float(),
                sparsity_lambda=cfg.sparsity_lambda * sparsity_factor(step, cfg.sparsity_warmup_steps),
                sparsity_c=cfg.sparsity_c,
                preactivation_coef=cfg.preactivation_coef,
                dead_mask=dead,
                auxk_coef=cfg.auxk_coef,
                auxk_k=cfg.auxk_k,
            )
            on = dense.activations != 0
            active, fired = on.sum(dim=(0, 2)).double(), on.any(dim=0)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        norm = self.grad_norm()
        limit = cfg.grad_clip_norm or math.inf
        scale = limit / (norm + 1e-6)
        self.optimizer.step(grad_scale=scale if scale < 1 else 1.0)
        return StepResult(terms, active.detach(), fired, norm)

    def grad_norm(self) -> float:
        """Global norm of the gradients over all ranks (the replicated decoder bias counted once)."""
        model = self.model
        sq = torch.zeros((), dtype=torch.float64, device=model.b_dec.device)
        for p, grad in self.optimizer.gradients():
            if p is not model.b_dec or model.shards.rank == 0:
                # accumulated in float32 for bf16 too (only the norm itself is rounded): no float32 copy of `grad`
                sq += torch.linalg.vector_norm(grad).double() ** 2
        return math.sqrt(model.shards.all_reduce(sq).item())
