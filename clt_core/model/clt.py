"""The cross-layer transcoder: plain PyTorch, the same code for one process and for feature shards.

Parameters (feature-first, as circuit-tracer stores them), for this rank's features [lo, hi) of every layer:
`W_enc [L, F, d]`, `b_enc [L, F]`, decoders `W_dec[s] [F, T_s, d]` writing to the targets `config.targets(s)`,
`b_dec [L, d]` (replicated), and for jumprelu `log_threshold [L, F]`. A cross-layer transcoder's layer s writes to
targets s..L-1 (T_s = L-s); with `decoders: per_layer` (the per-layer-transcoder baseline) to layer s alone
(T_s = 1), and everything else (encoder, activations, losses, the sparse path, feature shards) is the same code.

Initialisation follows "Circuit Tracing" (Anthropic 2025): W_enc ~ U(±1/√F), W_dec ~ U(±1/√(S·d)), biases 0,
thresholds at `jumprelu_threshold`, where S is the number of layers whose features write to the last layer: L for a
CLT (the paper's 1/√(L·d)), 1 for a per-layer transcoder (the usual 1/√d of a single-layer transcoder). So the
initial reconstruction of a layer written by all the layers it can be has the same scale in both, and a PLT does
not start √L times too small at every layer. The encoder is drawn identically in both (same seed, same weights).
Weights are drawn in blocks of 64 features from generators seeded by (seed, parameter, block), so any feature shard
draws exactly its slice of the single-process weights.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import torch
from torch import nn

from clt_core.errors import ConfigError
from clt_core.model.activations import jumprelu, select_topk
from clt_core.model.config import CLTConfig
from clt_core.model.decode import decode
from clt_core.model.parallel import FeatureShards
from clt_core.model.sparse import ComputeWeights, Selector, SparseActs, reconstruction_loss
from clt_core.model.sparse import decode as sparse_decode
from clt_core.model.sparse import encode as sparse_encode

_INIT_BLOCK = 64


class CLTOutput(NamedTuple):
    """What a forward pass returns."""

    reconstruction: torch.Tensor
    """Reconstructed (normalised) MLP outputs `[B, L, d]`, summed over feature shards, decoder bias included."""
    activations: torch.Tensor
    """Feature activations `[B, L, F_local]` of this rank's features."""
    preactivations: torch.Tensor
    """Encoder outputs `[B, L, F_local]` before the activation function."""


class SparseOutput(NamedTuple):
    """What the sparse (topk/batchtopk) forward pass returns."""

    reconstruction: torch.Tensor
    """Reconstructed (normalised) MLP outputs `[B, L, d]`, float32, summed over feature shards, `b_dec` included."""
    acts: SparseActs
    """This rank's active entries."""


def _uniform_rows(
    shape: tuple[int, ...], bound: float, seed: int, name: str, lo: int, hi: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows [lo, hi) of a `shape`-shaped U(±bound) tensor drawn in blocks of rows, each from its own generator."""
    blocks = []
    first, last = lo // _INIT_BLOCK, -(-hi // _INIT_BLOCK)
    for block in range(first, last):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{block}".encode()))
        rows = min(_INIT_BLOCK, shape[0] - block * _INIT_BLOCK)
        blocks.append(torch.empty(rows, *shape[1:], dtype=torch.float32).uniform_(-bound, bound, generator=gen))
    full = torch.cat(blocks) if blocks else torch.empty(0, *shape[1:])
    start = lo - first * _INIT_BLOCK
    return full[start : start + hi - lo].to(dtype)


class CrossLayerTranscoder(nn.Module):
    def __init__(self, config: CLTConfig, shards: FeatureShards | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.shards = shards or FeatureShards()
        L, d = config.sizes()
        F = config.num_features
        self.num_layers, self.d_model = L, d
        if F % self.shards.world_size:
            raise ConfigError(f"num_features={F} must be a multiple of the {self.shards.world_size} feature shards")
        lo, hi = self.shards.bounds(F)
        self.feature_range = (lo, hi)
        seed = config.seed
        enc_bound = 1 / math.sqrt(F)
        self.W_enc = nn.Parameter(
            torch.stack([_uniform_rows((F, d), enc_bound, seed, f"W_enc.{i}", lo, hi, dtype) for i in range(L)])
        )
        self.b_enc = nn.Parameter(torch.zeros(L, hi - lo, dtype=dtype))
        self.decoder_targets = [config.targets(s) for s in range(L)]
        """The layers each source layer's decoder writes to (`config.targets`)."""
        writers = sum(L - 1 in targets for targets in self.decoder_targets)  # L for a CLT, 1 for a PLT
        bound = 1 / math.sqrt(writers * d)
        self.W_dec = nn.ParameterList(
            nn.Parameter(_uniform_rows((F, len(t), d), bound, seed, f"W_dec.{s}", lo, hi, dtype))
            for s, t in enumerate(self.decoder_targets)
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d, dtype=dtype))
        if config.activation_fn == "jumprelu":
            start = math.log(config.jumprelu_threshold)
            self.log_threshold = nn.Parameter(torch.full((L, hi - lo), start, dtype=dtype))
        else:
            self.register_parameter("log_threshold", None)

    @property
    def num_local_features(self) -> int:
        return self.feature_range[1] - self.feature_range[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised MLP inputs `[B, L, d]` -> pre-activations `[B, L, F_local]`."""
        return torch.einsum("bld,lfd->blf", x, self.W_enc) + self.b_enc

    @property
    def threshold(self) -> torch.Tensor:
        """Per-feature activation threshold `[L, F_local]` (0 for activations without one)."""
        if self.log_threshold is None:
            return torch.zeros_like(self.b_enc)
        return self.log_threshold.exp()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.activation_fn == "jumprelu":
            return jumprelu(pre, self.log_threshold, cfg.jumprelu_bandwidth)
        if cfg.activation_fn == "relu":
            return pre.clamp_min(0)
        return select_topk(pre, cfg.k, cfg.activation_fn == "batchtopk", cfg.topk_scope, self.shards)

    # -- one layer at a time (spliced-in evaluation, the replacement model) -------------------------------------------

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Normalised MLP inputs of one layer `[N, d]` -> its pre-activations `[N, F_local]`."""
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def activate_layer(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        """One layer's pre-activations `[N, F_local]` -> its activations (batchtopk: the k·N largest of the N rows;
        a global k spans layers, so it has no one-layer form)."""
        cfg = self.config
        if cfg.activation_fn == "jumprelu":
            return jumprelu(pre[:, None], self.log_threshold[layer : layer + 1], cfg.jumprelu_bandwidth)[:, 0]
        if cfg.activation_fn == "relu":
            return pre.clamp_min(0)
        if cfg.topk_scope == "global":
            raise ConfigError(f"a {cfg.activation_fn} model with a global k has no per-layer activation")
        return select_topk(pre[:, None], cfg.k, cfg.activation_fn == "batchtopk", "per_layer", self.shards)[:, 0]

    def decode_layer(
        self, layer: int, acts: torch.Tensor, sparse: bool | None = None, grad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Activations of one source layer `[N, F_local]` -> this shard's decoding of them into its targets
        `decoder_targets[layer]` (`layer..L-1`, or `layer` alone per layer), `[N, T·d]` (no bias, not summed over
        shards). `sparse`: decode the active rows only (default: for topk/batchtopk, or below
        `sparse_decode_density`)."""
        W = self.W_dec[layer]
        if sparse is None:
            sparse = self._decodes_sparsely(acts)
        return decode(acts, W.reshape(W.shape[0], -1), sparse, grad_mask)

    def _decodes_sparsely(self, acts: torch.Tensor) -> bool:
        cfg = self.config
        return (
            cfg.activation_fn in ("batchtopk", "topk") or (acts != 0).float().mean().item() < cfg.sparse_decode_density
        )

    # -- every layer ------------------------------------------------------------------------------------------------

    def decode(self, acts: torch.Tensor, pre: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """Activations `[B, L, F_local]` -> reconstruction `[B, L, d]`, summed over shards (+ `b_dec`)."""
        cfg = self.config
        B, L, d = acts.shape[0], self.num_layers, self.d_model
        sparse = self._decodes_sparsely(acts)
        grad_mask = None
        if sparse and cfg.activation_fn == "jumprelu" and pre is not None and self.log_threshold.requires_grad:
            # Entries just below their threshold are 0 but carry the threshold's gradient.
            grad_mask = (pre.detach() - self.threshold.detach()).abs() < cfg.jumprelu_bandwidth / 2
        # Accumulate in float32 at least (bf16 partial sums would lose the small contributions).
        dtype = torch.promote_types(self.b_dec.dtype, torch.float32)
        out = torch.zeros(B, L * d, dtype=dtype, device=acts.device)
        for s, targets in enumerate(self.decoder_targets):
            part = self.decode_layer(s, acts[:, s], sparse, None if grad_mask is None else grad_mask[:, s])
            out[:, targets.start * d : targets.stop * d] += part
        out = self.shards.sum_partials(out).reshape(B, L, d)
        return out + self.b_dec if bias else out

    def forward(self, x: torch.Tensor) -> CLTOutput:
        pre = self.encode(x)
        acts = self.activate(pre)
        return CLTOutput(self.decode(acts, pre), acts, pre)

    def compute_weights(self, dtype: torch.dtype) -> ComputeWeights:
        """A copy of the encoder and decoders in `dtype`, laid out for `sparse_forward`."""
        return ComputeWeights(self, dtype)

    def _selector(self) -> Selector:
        cfg = self.config
        return Selector(cfg.k, cfg.activation_fn == "batchtopk", cfg.topk_scope, self.shards)

    @torch.no_grad()
    def sparse_forward(self, x: torch.Tensor, weights: ComputeWeights) -> SparseOutput:
        """The topk/batchtopk forward pass on active entries only (see model/sparse.py), with `weights` (a
        `compute_weights` copy) for the encoder and decoders; no gradient (training uses `sparse_loss`)."""
        acts = sparse_encode(x, weights, self.b_enc, self._selector())
        return SparseOutput(sparse_decode(acts, weights, self.b_dec, self.shards, x.shape[0]), acts)

    def sparse_loss(self, x: torch.Tensor, y: torch.Tensor, weights: ComputeWeights) -> tuple[torch.Tensor, SparseActs]:
        """The reconstruction loss per layer `[L]` (MSE over tokens and dimensions) of targets `y` from inputs `x`
        on the sparse path, and the active entries; backward leaves the encoder's and decoders' gradients in
        `weights`' buffers and the biases' on the parameters."""
        acts = sparse_encode(x, weights, self.b_enc, self._selector())
        return reconstruction_loss(acts, y, self.b_dec, weights, self.shards), acts

    def decoder_norms(self) -> torch.Tensor:
        """‖W_dec‖ of each feature over all the targets it writes to, `[L, F_local]`."""
        return torch.stack([w.flatten(1).norm(dim=1) for w in self.W_dec])
