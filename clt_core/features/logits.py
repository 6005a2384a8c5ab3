"""Each feature's top and bottom logits: its direct effect on the residual stream, read through the unembedding.

The direction of feature f of layer s is the sum of its decoder rows over the layers it writes to, in raw units
(de-normalised: `Σ_j W_dec[s][f, j] · σ_t[s+j]`; a per-layer transcoder has one row): what one unit of its activation
adds to the residual stream, the target means being part of the bias, not of any feature. It goes through the final
norm's linear part at that direction — the norm module applied to the direction alone, minus the norm of a zero
vector (LayerNorm's bias) — then the unembedding's weight (its bias, if any, left out): `W_U · (norm(v) − norm(0))`.
For RMSNorm that is `W_U · (w ⊙ v) / rms(v)` (Gemma's `1 + w` included), for LayerNorm the centred direction times
its weight; the positive scale `1/rms(v)` does not change the order of the logits, so the tokens are those of
`W_U · (w ⊙ v)`. A model whose final norm is not found is read without one (a warning says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clt_core.data.sampler import Normalizer
from clt_core.model.clt import CrossLayerTranscoder

log = logging.getLogger(__name__)

FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
"""Names of the final norm on a transformers base model (Llama/Mistral/Qwen/Gemma, GPT-2, GPT-NeoX, Phi)."""


def decoder_directions(model: CrossLayerTranscoder, normalizer: Normalizer | None, layer: int) -> torch.Tensor:
    """`[F, d]`: the raw residual-stream direction of each feature of `layer`, summed over its target layers."""
    W = model.W_dec[layer].detach().float()  # [F, T_s, d]
    targets = model.decoder_targets[layer]
    if normalizer is not None:
        W = W * normalizer.targets_std[targets.start : targets.stop].to(W.device, W.dtype)[None]
    return W.sum(1)


def final_norm(lm: nn.Module) -> nn.Module | None:
    """The norm before the unembedding of a transformers causal LM, or None."""
    base: Any = getattr(lm, "base_model", lm)
    for name in FINAL_NORMS:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def through_unembedding(lm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`[N, d]` residual directions -> `[N, V]` logits, as in the module docstring."""
    W_U = lm.get_output_embeddings().weight  # type: ignore[operator]
    norm = final_norm(lm)
    if norm is None:
        log.warning("%s: no final norm found (%s); logits read without it", type(lm).__name__, ", ".join(FINAL_NORMS))

    def apply(v: torch.Tensor) -> torch.Tensor:
        v = v.to(W_U.device, W_U.dtype)
        if norm is not None:
            v = norm(v) - norm(torch.zeros_like(v[:1]))
        return v @ W_U.T

    return apply


@torch.no_grad()
def logit_tokens(
    lm: nn.Module,
    model: CrossLayerTranscoder,
    normalizer: Normalizer | None,
    layer: int,
    count: int,
    *,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[F, count]` of the largest and of the smallest logits of each feature of `layer` (largest and
    smallest first)."""
    directions = decoder_directions(model, normalizer, layer)
    apply = through_unembedding(lm)
    top, bottom = [], []
    for start in range(0, directions.shape[0], chunk):
        logits = apply(directions[start : start + chunk]).float()
        k = min(count, logits.shape[1])
        top.append(logits.topk(k, dim=1).indices.cpu())
        bottom.append(logits.topk(k, dim=1, largest=False).indices.cpu())
    return torch.cat(top), torch.cat(bottom)
