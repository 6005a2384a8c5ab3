"""The topk/batchtopk CLT step on active entries only: encode → exact top-k selection → sparse decode.

With `k` of `F` features active per token and layer, everything after the encoder's matmul scales with the active
entries, not with `F`:
- selection keeps exactly `count` entries per group (ties at the threshold broken by position, and across feature
  shards by rank), so `k` is exact in bf16 too, where pre-activations tie often;
- the decoder runs per (source s, target t) block `W[s→t] [F, d]` (in cache) as three gather kernels:
  reconstruction rows `Σ a·W[f]` (an embedding bag per token), decoder gradients `Σ a·g[b]` (an embedding bag per
  feature, over the target's error rows) and activation gradients `g[b]·W[f]` (sampled dot products);
- the encoder's backward touches only the active entries: `dW_enc[f] = Σ_b g[b,f]·x[b]` (an embedding bag per
  feature over the layer's inputs).
The weights used are a `ComputeWeights` copy in the compute dtype, laid out for these kernels (decoders target-major,
`[L-s, F, d]`); their gradients land on that copy, and `MixedAdam` (train/optim.py) applies them to the float32
parameters. Accumulation is float32 in every kernel.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F_

from clt_core.model.parallel import FeatureShards

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SparseActs(NamedTuple):
    """Active entries of every layer, token-major within each layer: entries `[ptr[l], ptr[l+1])` are layer l's."""

    values: torch.Tensor
    """Activation values `[nnz]` (float32, all > 0), differentiable."""
    tokens: torch.Tensor
    """Token (batch row) of each entry `[nnz]`."""
    features: torch.Tensor
    """Local feature index of each entry `[nnz]`."""
    ptr: tuple[int, ...]
    """Entry boundaries of the layers, `L + 1` values."""

    def layer(self, layer: int) -> slice:
        return slice(self.ptr[layer], self.ptr[layer + 1])

    def counts_per_layer(self) -> torch.Tensor:
        """Active entries of each layer `[L]`."""
        return torch.tensor([b - a for a, b in zip(self.ptr, self.ptr[1:], strict=False)], dtype=torch.float64)

    def fired(self, num_features: int) -> torch.Tensor:
        """Whether each feature fired in the batch, `[L, F_local]`."""
        L = len(self.ptr) - 1
        out = torch.zeros(L, num_features, dtype=torch.bool, device=self.values.device)
        for layer in range(L):
            out[layer, self.features[self.layer(layer)]] = True
        return out

    def to_dense(self, batch: int, num_features: int) -> torch.Tensor:
        """Activations `[B, L, F_local]`."""
        L = len(self.ptr) - 1
        out = torch.zeros(batch, L, num_features, dtype=self.values.dtype, device=self.values.device)
        layers = torch.repeat_interleave(
            torch.arange(L, device=self.values.device), torch.diff(torch.tensor(self.ptr)).to(self.values.device)
        )
        out[self.tokens, layers, self.features] = self.values.detach()
        return out


class ComputeWeights:
    """The encoder and decoder weights in the compute dtype, laid out for the sparse kernels: `W_enc [L, F, d]` and
    decoders `W_dec[s] [L-s, F, d]` (block `W_dec[s][t-s]` maps source s to target t). Leaf tensors: backward
    leaves their gradients here. `refresh` copies the float32 parameters in after each optimiser step."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.W_enc = torch.empty(model.W_enc.shape, dtype=dtype, device=model.W_enc.device)
        self.W_dec = [torch.empty(w.transpose(0, 1).shape, dtype=dtype, device=w.device) for w in model.W_dec]
        self.refresh(model)
        for w in self.tensors():
            w.requires_grad_(True)

    def tensors(self) -> list[torch.Tensor]:
        return [self.W_enc, *self.W_dec]

    @torch.no_grad()
    def refresh(self, model: torch.nn.Module) -> None:
        self.W_enc.copy_(model.W_enc)
        for copy, w in zip(self.W_dec, model.W_dec, strict=True):
            copy.copy_(w.transpose(0, 1))

    def zero_grad(self) -> None:
        for w in self.tensors():
            w.grad = None


# -- selection ---------------------------------------------------------------------------------------------------------


def _threshold(scores: torch.Tensor, count: int, shards: FeatureShards) -> torch.Tensor:
    """The `count`-th largest value of each row of `scores [G, N_local]` over all ranks' entries, `[G, 1]`."""
    from clt_core.model.activations import largest

    candidates = largest(scores, min(count, scores.shape[1]))
    if shards.world_size == 1:
        return candidates.min(dim=1, keepdim=True).values
    candidates = shards.all_gather_cat(candidates, dim=1)
    return candidates.topk(count, dim=1).values[:, -1:]


def select_exact(scores: torch.Tensor, count: int, shards: FeatureShards) -> torch.Tensor:
    """Mask of exactly `count` entries per row of `scores [G, N_local]` (over all ranks): every entry above the
    row's `count`-th largest value, then as many tied at it as are still needed, by position (earlier ranks first)."""
    threshold = _threshold(scores, count, shards)
    mask = scores >= threshold
    taken = shards.all_reduce(mask.sum(dim=1, keepdim=True))
    if bool((taken == count).all()):
        return mask
    above = scores > threshold
    ties = mask & ~above
    need = count - shards.all_reduce(above.sum(dim=1, keepdim=True))
    if shards.world_size > 1:  # ties on earlier ranks go first
        per_rank = shards.all_gather_cat(ties.sum(dim=1, keepdim=True), dim=1)
        need = need - per_rank[:, : shards.rank].sum(dim=1, keepdim=True)
    rows, cols = ties.nonzero(as_tuple=True)  # row-major: each row's ties in position order
    first = torch.zeros(len(scores) + 1, dtype=torch.int64, device=scores.device)
    first[1:] = torch.bincount(rows, minlength=len(scores)).cumsum(0)
    rank_in_row = torch.arange(len(rows), device=scores.device) - first[rows]
    keep = rank_in_row < need.squeeze(1)[rows]
    above[rows[keep], cols[keep]] = True
    return above


class Selector:
    """Which pre-activations are active (batchtopk: `per_batch`; topk otherwise), per layer or over all layers.

    `per_layer` selections are made one layer at a time (`layer`), so a layer's dense pre-activations are dropped
    as soon as its entries are picked; `global` ones over all layers at once (`all_layers`)."""

    def __init__(self, k: float, per_batch: bool, scope: str, shards: FeatureShards) -> None:
        self.k, self.per_batch, self.per_layer, self.shards = k, per_batch, scope == "per_layer", shards

    def layer(self, z: torch.Tensor) -> torch.Tensor:
        """Flat indices (token-major) of the active entries of one layer's `z [B, F_local]`."""
        B, F = z.shape
        count = max(round(self.k * B) if self.per_batch else round(self.k), 1)
        mask = select_exact(z.reshape(1, B * F) if self.per_batch else z, count, self.shards)
        return (mask.reshape(B, F) & (z > 0)).reshape(-1).nonzero().squeeze(1)

    def all_layers(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Flat indices per layer of the active entries of `z [L, B, F_local]`."""
        L, B, F = z.shape
        if self.per_batch:
            mask = select_exact(z.reshape(1, L * B * F), max(round(self.k * B), 1), self.shards).reshape(L, B, F)
        else:
            mask = select_exact(z.permute(1, 0, 2).reshape(B, L * F), max(round(self.k), 1), self.shards)
            mask = mask.reshape(B, L, F).permute(1, 0, 2)
        mask &= z > 0
        return [mask[layer].reshape(-1).nonzero().squeeze(1) for layer in range(L)]


# -- gather kernels ----------------------------------------------------------------------------------------------------


def bag_offsets(groups: torch.Tensor, count: int) -> torch.Tensor:
    """Start of each group's run in a sorted `groups` vector, `[count]` (embedding-bag offsets)."""
    starts = torch.zeros(count, dtype=torch.int64, device=groups.device)
    starts[1:] = torch.bincount(groups, minlength=count)[:-1].cumsum(0)
    return starts


def gather_sum(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`out[i] = Σ_{j in bag i} weights[j]·table[rows[j]]`, bags given by `offsets`; accumulated in float32."""
    return F_.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


class SampledDots:
    """`out[j] = a[rows[j]] · b[cols[j]]` for one pattern (`rows` sorted) and many operand pairs, in float32."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int) -> None:
        self.rows, self.cols = rows, cols
        if rows.device.type == "cpu":  # MKL's sampled dense-dense product (float32 only; both operands in cache)
            crow = torch.zeros(num_rows + 1, dtype=torch.int64)
            crow[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
            self.pattern = torch.sparse_csr_tensor(
                crow, cols, torch.zeros(len(cols)), (num_rows, num_cols), check_invariants=False
            )

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.rows.device.type == "cpu":
            return torch.sparse.sampled_addmm(self.pattern, a.float(), b.float().t(), beta=0.0).values()
        return (a[self.rows].float() * b[self.cols].float()).sum(dim=1)


# -- autograd ----------------------------------------------------------------------------------------------------------


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, select: Selector) -> tuple[Any, ...]:
        """`x [L, B, d]`, `W [L, F, d]` (compute dtype), `b [L, F]` -> values, tokens, features, layer sizes."""
        L, Fl = W.shape[0], W.shape[1]

        bias = b.detach().to(x.dtype)

        def pre(layer: int) -> torch.Tensor:  # in the compute dtype: selection reads half the bytes in bf16
            return torch.addmm(bias[layer], x[layer], W[layer].t())

        if select.per_layer:
            values, flat = [], []
            for layer in range(L):
                z = pre(layer)
                flat.append(select.layer(z))
                values.append(z.reshape(-1)[flat[-1]])
        else:
            z = torch.stack([pre(layer) for layer in range(L)])
            flat = select.all_layers(z)
            values = [z[layer].reshape(-1)[i] for layer, i in enumerate(flat)]
        flat_all = torch.cat(flat)
        tokens, features = flat_all // Fl, flat_all % Fl
        sizes = torch.tensor([len(i) for i in flat])
        ctx.save_for_backward(x, tokens, features, sizes)
        ctx.mark_non_differentiable(tokens, features, sizes)
        ctx.W_shape, ctx.W_dtype = W.shape, W.dtype
        return torch.cat(values).float(), tokens, features, sizes

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        x, tokens, features, sizes = ctx.saved_tensors
        L, Fl, _ = ctx.W_shape
        dW = torch.empty(ctx.W_shape, dtype=ctx.W_dtype, device=x.device) if ctx.needs_input_grad[1] else None
        db = torch.zeros(L, Fl, dtype=torch.float32, device=x.device)
        start = 0
        for layer, size in enumerate(sizes.tolist()):
            part = slice(start, start + size)
            start += size
            f, g = features[part], grad[part]
            db[layer].index_add_(0, f, g.float())
            if dW is not None:
                order = torch.argsort(f, stable=True)
                dW[layer] = gather_sum(x[layer], tokens[part][order], bag_offsets(f[order], Fl), g[order])
        return None, dW, db, None


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, acts: SparseActs, batch: int, *W_dec: torch.Tensor) -> torch.Tensor:
        """Active entries and decoders `W_dec[s] [L-s, F, d]` -> reconstruction `[L, B, d]` (float32, no bias)."""
        L, d = len(W_dec), W_dec[0].shape[2]
        out = torch.zeros(L, batch, d, dtype=torch.float32, device=values.device)
        for s in range(L):
            part = acts.layer(s)
            rows, v = acts.features[part], values[part]
            offsets = bag_offsets(acts.tokens[part], batch)
            for t in range(s, L):
                out[t] += gather_sum(W_dec[s][t - s], rows, offsets, v)
        ctx.save_for_backward(values, acts.tokens, acts.features, *W_dec)
        ctx.ptr, ctx.batch = acts.ptr, batch
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        values, tokens, features, *W_dec = ctx.saved_tensors
        L, Fl = len(W_dec), W_dec[0].shape[1]
        grad = grad.contiguous()  # [L, B, d] float32
        g_low = grad.to(W_dec[0].dtype)
        grad_values = torch.zeros_like(values)
        grad_W: list[torch.Tensor | None] = []
        for s in range(L):
            part = slice(ctx.ptr[s], ctx.ptr[s + 1])
            f, tok, v = features[part], tokens[part], values[part]
            order = torch.argsort(f, stable=True)
            f_offsets, tok_by_f, v_by_f = bag_offsets(f[order], Fl), tok[order], v[order]
            dW = torch.empty_like(W_dec[s]) if ctx.needs_input_grad[3 + s] else None
            acc = torch.zeros(len(f), dtype=torch.float32, device=values.device)
            dots = SampledDots(tok, f, ctx.batch, Fl)
            for t in range(s, L):
                acc += dots(grad[t], W_dec[s][t - s])
                if dW is not None:
                    dW[t - s] = gather_sum(g_low[t], tok_by_f, f_offsets, v_by_f)
            grad_values[part] = acc
            grad_W.append(dW)
        return (grad_values, None, None, *grad_W)


def encode(x: torch.Tensor, weights: ComputeWeights, b_enc: torch.Tensor, select: Selector) -> SparseActs:
    """Normalised inputs `[B, L, d]` -> the active entries."""
    xl = x.transpose(0, 1).to(weights.dtype).contiguous()
    values, tokens, features, sizes = _Encode.apply(xl, weights.W_enc, b_enc, select)
    ptr = [0]
    for n in sizes.tolist():
        ptr.append(ptr[-1] + n)
    return SparseActs(values, tokens, features, tuple(ptr))


def decode(acts: SparseActs, weights: ComputeWeights, batch: int, shards: FeatureShards) -> torch.Tensor:
    """Active entries -> reconstruction `[B, L, d]` summed over feature shards (no bias), float32."""
    out = _Decode.apply(acts.values, acts, batch, *weights.W_dec)
    return shards.sum_partials(out).transpose(0, 1)
