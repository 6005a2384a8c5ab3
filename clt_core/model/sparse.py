"""The topk/batchtopk CLT step on active entries only: encode → exact top-k selection → sparse decode.

With `k` of `F` features active per token and layer, everything after the encoder's matmul scales with the active
entries, not with `F`:
- selection keeps exactly `count` entries per group (ties at the threshold broken deterministically, across feature
  shards by rank), so `k` is exact in bf16 too, where pre-activations tie often;
- the decoder runs per (source s, target t) block `W[s→t] [F, d]` (in cache) as three gather kernels:
  reconstruction rows `Σ a·W[f]` (an embedding bag per token), decoder gradients `Σ a·g[b]` (an embedding bag per
  feature, over the target's error rows) and activation gradients `g[b]·W[f]` (sampled dot products);
- the encoder's backward touches only the active entries: `dW_enc[f] = Σ_b g[b,f]·x[b]` (an embedding bag per
  feature over the layer's inputs).
The weights used are a `ComputeWeights` copy in the compute dtype, laid out for these kernels (decoders target-major,
`[T_s, F, d]`: T_s = L-s targets s..L-1 for a cross-layer transcoder, 1 (target s) for a per-layer one, which the
kernels take as they are: they decode into, and read the loss gradient of, the T_s rows given); their gradients land
in that copy's buffers, and `MixedAdam` (train/optim.py) applies them to the float32 parameters. Accumulation is
float32 in every kernel.
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F_

from clt_core.model import kernels
from clt_core.model.activations import floor_of_sample, is_long_row, positions_above_floor, sample_stride
from clt_core.model.parallel import FeatureShards

if TYPE_CHECKING:  # clt.py imports this module
    from clt_core.model.clt import CrossLayerTranscoder

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class ByFeature(NamedTuple):
    """The active entries of each layer in feature-major order, as the decoder's and encoder's backward read them."""

    order: torch.Tensor
    """Position within its layer of each entry, layer by layer in feature-major order (stable) `[nnz]`."""
    tokens: torch.Tensor
    """The tokens of the entries in that order `[nnz]`."""
    bounds: torch.Tensor
    """Per layer, the CSR pointers of its entries by feature `[L, F_local + 1]`."""


def by_feature(features: torch.Tensor, tokens: torch.Tensor, ptr: tuple[int, ...], num_features: int) -> ByFeature:
    """The feature-major order of token-major entries (see ByFeature)."""
    if kernels.compiled_for(features):
        return ByFeature(*kernels.feature_major(features, tokens, torch.tensor(ptr), num_features))
    orders, tokens_by_f, bounds = [], [], []
    for lo, hi in itertools.pairwise(ptr):
        f = features[lo:hi]
        order = torch.argsort(f, stable=True)
        orders.append(order)
        tokens_by_f.append(tokens[lo:hi][order])
        bounds.append(group_bounds(f[order], num_features))
    return ByFeature(torch.cat(orders), torch.cat(tokens_by_f), torch.stack(bounds))


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
    by_feature: ByFeature

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
    decoders `W_dec[s] [T_s, F, d]` (block `W_dec[s][t-s]` maps source s to target t, for its T_s consecutive
    targets from s on: L-s of them in a cross-layer transcoder, 1 in a per-layer one), and their gradients.

    Backward writes the gradients into buffers kept from step to step (`grad`): a fresh gigabyte-sized allocation
    each step would cost more in page faults than the kernels that fill it. `refresh` copies the float32
    parameters in after each optimiser step."""

    def __init__(self, model: CrossLayerTranscoder, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.W_enc = torch.empty(model.W_enc.shape, dtype=dtype, device=model.W_enc.device)
        self.W_dec = [torch.empty(w.transpose(0, 1).shape, dtype=dtype, device=w.device) for w in model.W_dec]
        self._grads: list[torch.Tensor | None] = [None] * (1 + len(self.W_dec))
        self._workspace: dict[str, torch.Tensor] = {}
        self.has_grad = False
        """Whether the buffers hold the gradients of the last backward pass (cleared by `zero_grad`)."""
        self.refresh(model)

    def tensors(self) -> list[torch.Tensor]:
        return [self.W_enc, *self.W_dec]

    def grad_buffer(self, index: int) -> torch.Tensor:
        """The gradient buffer of `tensors()[index]` (allocated once; backward overwrites all of it)."""
        buffer = self._grads[index]
        if buffer is None:
            buffer = self._grads[index] = torch.empty_like(self.tensors()[index])
        self.has_grad = True
        return buffer

    def grad(self, index: int) -> torch.Tensor | None:
        """The gradient of `tensors()[index]` from the last backward pass (None after `zero_grad`)."""
        return self._grads[index] if self.has_grad else None

    @torch.no_grad()
    def refresh(self, model: CrossLayerTranscoder) -> None:
        self.W_enc.copy_(model.W_enc)
        for copy, w in zip(self.W_dec, model.W_dec, strict=True):
            copy.copy_(w.transpose(0, 1))

    def zero_grad(self) -> None:
        self.has_grad = False

    def workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A step's scratch tensor `name`, kept for the next step of the same shape (contents undefined)."""
        buffer = self._workspace.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._workspace[name] = torch.empty(shape, dtype=dtype, device=self.W_enc.device)
        return buffer


# -- selection ---------------------------------------------------------------------------------------------------------


def _candidates(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and positions `[G, c]` of at least the `count` largest entries of each row of `scores [G, N]`
    (c = min(count, N) unless more are returned), positions ascending within each row.

    A long single row (batchtopk ranks B·F or B·L·F values) is not sorted: only the entries above a sampled floor
    (`positions_above_floor`, ~20 % more than `count`) are returned. Should the sample be unlucky, `topk` decides."""
    G, N = scores.shape
    if G == 1 and is_long_row(N, count):
        positions = positions_above_floor(scores[0], count)
        if positions is not None:
            return scores[0][positions][None], positions[None]
    values, positions = scores.topk(min(count, N), dim=1, sorted=False)
    positions, order = positions.sort(dim=1)
    return values.gather(1, order), positions


def select_exact(
    scores: torch.Tensor, count: int, shards: FeatureShards
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, columns (row-major, columns ascending) and values of exactly `count` entries per row of
    `scores [G, N_local]` ranked over all ranks' entries: every entry above the row's `count`-th largest value, then
    as many tied at it as are still needed (earlier ranks first; within a long row by position, within short rows in
    `topk`'s order)."""
    return choose_exact(*_candidates(scores, count), count, shards)


def choose_exact(
    values: torch.Tensor, positions: torch.Tensor, count: int, shards: FeatureShards
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`select_exact` from each row's candidates (`values`, `positions [G, c]`, positions ascending): at least the
    row's `count` largest entries."""
    G = values.shape[0]
    if shards.world_size == 1:
        if values.shape[1] > count:  # the count largest; ties by position (positions ascend within rows)
            threshold = values.kthvalue(values.shape[1] - count + 1, dim=1, keepdim=True).values
            above, ties = values > threshold, values == threshold
            need = count - above.sum(dim=1, keepdim=True)
            rows, cols = (above | (ties & (ties.cumsum(dim=1) <= need))).nonzero(as_tuple=True)
            return rows, positions[rows, cols], values[rows, cols]
        rows = torch.arange(G, device=values.device).repeat_interleave(positions.shape[1])
        return rows, positions.reshape(-1), values.reshape(-1)
    top = values.topk(min(count, values.shape[1]), dim=1).values
    threshold = shards.all_gather_cat(top, dim=1).topk(count, dim=1).values[:, -1:]
    above, ties = values > threshold, values == threshold
    need = count - shards.all_reduce(above.sum(dim=1, keepdim=True))
    earlier = shards.all_gather_cat(ties.sum(dim=1, keepdim=True), dim=1)[:, : shards.rank].sum(dim=1, keepdim=True)
    keep = above | (ties & (ties.cumsum(dim=1) <= need - earlier))
    rows, cols = keep.nonzero(as_tuple=True)
    return rows, positions[rows, cols], values[rows, cols]


class Selector:
    """Which pre-activations are active (batchtopk: `per_batch`; topk otherwise), per layer or over all layers.

    `per_layer` selections are made one layer at a time (`layer`, or `layer_from_low` straight from a bf16 matmul's
    output), so a layer's dense pre-activations are dropped as soon as its entries are picked; `global` ones over all
    layers at once (`all_layers`). All return flat indices `b·F + f` per layer, ascending, of the selected entries
    that are positive, and their values."""

    def __init__(self, k: float, per_batch: bool, scope: str, shards: FeatureShards) -> None:
        self.k, self.per_batch, self.per_layer, self.shards = k, per_batch, scope == "per_layer", shards
        self._sample: tuple[tuple[int, int, int, torch.device], torch.Tensor, torch.Tensor] | None = None

    def layer(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Active entries of one layer's `z [B, F_local]`."""
        B, F = z.shape
        if self.per_batch:
            _, flat, values = select_exact(z.reshape(1, B * F), max(round(self.k * B), 1), self.shards)
        else:
            rows, cols, values = select_exact(z, max(round(self.k), 1), self.shards)
            flat = rows * F + cols
        return _positive(flat, values)

    def layer_from_low(self, low: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`layer(low.float() + bias)` for a batchtopk layer's bf16 pre-activations `low [B, F_local]` on the CPU,
        without forming the float32 matrix: the compiled kernel collects the entries above a sampled floor. None
        where it does not apply (or the sample was unlucky): call `layer`."""
        B, F = low.shape
        count = max(round(self.k * B), 1)
        if not (self.per_batch and is_long_row(B * F, count) and kernels.available(low)):
            return None
        stride = sample_stride(B * F)
        at, feature = self._sample_positions(B, F, stride, low.device)
        floor = floor_of_sample(low.reshape(-1)[at].float() + bias[feature], stride, count)
        found = kernels.entries_above(low, bias, floor, capacity=2 * count + 4096)
        if found is None or len(found[0]) < count:
            return None
        _, flat, values = choose_exact(found[1][None], found[0][None], count, self.shards)
        return _positive(flat, values)

    def _sample_positions(self, B: int, F: int, stride: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat positions of `layer_from_low`'s sample and their features (the same every layer and step)."""
        key = (B, F, stride, device)
        if self._sample is None or self._sample[0] != key:
            at = torch.arange(0, B * F, stride, device=device)
            self._sample = (key, at, at % F)
        return self._sample[1], self._sample[2]

    def all_layers(self, z: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Active entries of each layer of `z [L, B, F_local]`."""
        L, B, F = z.shape
        if self.per_batch:
            _, flat, values = select_exact(z.reshape(1, L * B * F), max(round(self.k * B), 1), self.shards)
        else:  # per token over all layers: rank `[B, L·F]` rows, then order by layer
            rows, cols, values = select_exact(z.permute(1, 0, 2).reshape(B, L * F), max(round(self.k), 1), self.shards)
            flat, order = (((cols // F) * B + rows) * F + cols % F).sort()
            values = values[order]
        flat, values = _positive(flat, values)
        layer_of = flat // (B * F)
        sizes = torch.bincount(layer_of, minlength=L).tolist()
        return list(zip((flat - layer_of * (B * F)).split(sizes), values.split(sizes), strict=True))


def _positive(flat: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected entries whose values are positive (a selected pre-activation at or below 0 is inactive)."""
    keep = values > 0
    return (flat, values) if bool(keep.all()) else (flat[keep], values[keep])


# -- gather kernels ----------------------------------------------------------------------------------------------------


def group_bounds(groups: torch.Tensor, count: int) -> torch.Tensor:
    """Start of each group's run in a sorted `groups` vector, and the end, `[count + 1]` (CSR row pointers)."""
    bounds = torch.zeros(count + 1, dtype=torch.int64, device=groups.device)
    bounds[1:] = torch.bincount(groups, minlength=count).cumsum(0)
    return bounds


def bag_offsets(groups: torch.Tensor, count: int) -> torch.Tensor:
    """Start of each group's run in a sorted `groups` vector, `[count]` (embedding-bag offsets)."""
    return group_bounds(groups, count)[:-1]


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
    def forward(
        ctx: Any, x: torch.Tensor, b: torch.Tensor, weights: ComputeWeights, select: Selector
    ) -> tuple[Any, ...]:
        """`x [L, B, d]` (compute dtype), `b [L, F]` -> values, tokens, features, layer sizes."""
        W = weights.W_enc
        L, Fl = W.shape[0], W.shape[1]

        B = x.shape[1]

        def low_matmul(layer: int) -> torch.Tensor:  # the bf16 product, in one reused buffer
            return torch.mm(x[layer], W[layer].t(), out=weights.workspace("preactivations_low", (B, Fl), x.dtype))

        def pre(layer: int, out: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
            """float32 pre-activations (bf16 comparisons and sorts are slow), from `low` when already computed."""
            if x.dtype == torch.float32:
                return torch.addmm(b[layer], x[layer], W[layer].t(), out=out)
            return out.copy_(low_matmul(layer) if low is None else low).add_(b[layer])

        if select.per_layer:  # one layer's pre-activations at a time, in one reused buffer
            picked = []
            z_buffer = weights.workspace("preactivations", (B, Fl), torch.float32)
            for layer in range(L):
                low = None if x.dtype == torch.float32 else low_matmul(layer)
                found = None if low is None else select.layer_from_low(low, b[layer].detach())
                picked.append(found if found is not None else select.layer(pre(layer, z_buffer, low)))
        else:
            z = torch.empty(L, B, Fl, dtype=torch.float32, device=x.device)
            for layer in range(L):
                pre(layer, z[layer])
            picked = select.all_layers(z)
        flat = [f for f, _ in picked]
        values = [v for _, v in picked]
        flat_all = torch.cat(flat)
        if Fl & (Fl - 1) == 0:  # a power of two: shift and mask (integer division is not vectorised)
            tokens, features = flat_all >> (Fl.bit_length() - 1), flat_all & (Fl - 1)
        else:
            tokens, features = flat_all // Fl, flat_all % Fl
        ptr = (0, *itertools.accumulate(len(f) for f in flat))
        order, tokens_by_f, bounds = by_feature(features, tokens, ptr, Fl)
        sizes = torch.tensor([len(f) for f in flat])
        ctx.save_for_backward(x, order, tokens_by_f, bounds, features, sizes)
        ctx.mark_non_differentiable(tokens, features, sizes, order, tokens_by_f, bounds)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the integer outputs
        ctx.weights = weights
        return torch.cat(values), tokens, features, sizes, order, tokens_by_f, bounds

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        x, order, tokens_by_f, bounds, features, sizes = ctx.saved_tensors
        L, Fl, _ = ctx.weights.W_enc.shape
        dW = ctx.weights.grad_buffer(0)
        db = torch.zeros(L, Fl, dtype=torch.float32, device=x.device)
        start = 0
        for layer, size in enumerate(sizes.tolist()):
            part = slice(start, start + size)
            start += size
            g = grad[part]
            db[layer].index_add_(0, features[part], g.float())
            dW[layer] = gather_sum(x[layer], tokens_by_f[part], bounds[layer, :-1], g[order[part]])
        return None, db, None, None


def _decode_into(out: torch.Tensor, values: torch.Tensor, acts: SparseActs, weights: ComputeWeights) -> None:
    """`out [L, B, d]` (float32, zeroed or holding a bias) += this rank's reconstruction of the active entries."""
    W_dec, batch = weights.W_dec, out.shape[1]
    compiled = kernels.available(W_dec[0])
    for s in range(len(W_dec)):
        part = acts.layer(s)
        rows, v = acts.features[part], values[part]
        targets = slice(s, s + W_dec[s].shape[0])  # s..L-1, or s alone for a per-layer transcoder
        if compiled:
            kernels.decode(out[targets], W_dec[s], group_bounds(acts.tokens[part], batch), rows, v.detach().float())
            continue
        offsets = bag_offsets(acts.tokens[part], batch)
        for j in range(W_dec[s].shape[0]):
            out[s + j] += gather_sum(W_dec[s][j], rows, offsets, v)


class _DecodeLoss(torch.autograd.Function):
    """Decode, sum over shards, add `b_dec` and take the loss Σ_l MSE_l, in one float32 buffer `[L, B, d]` that
    holds the reconstruction, then the error, then (in backward, in place) its gradient: no other tensor of that
    size is made, and each step reuses the buffer."""

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        b_dec: torch.Tensor,
        acts: SparseActs,
        targets: torch.Tensor,
        weights: ComputeWeights,
        shards: FeatureShards,
    ) -> torch.Tensor:
        """-> the loss per layer `[L]`, float32."""
        B, L, d = targets.shape
        out = weights.workspace("error", (L, B, d), torch.float32)
        out.zero_()
        _decode_into(out, values, acts, weights)
        if shards.world_size > 1:
            shards.all_reduce(out)
        if kernels.available(weights.W_dec[0]) and targets.dtype == torch.bfloat16 and targets.is_contiguous():
            kernels.error(out, targets, b_dec.detach().float().contiguous())
        else:
            out += b_dec.detach()[:, None]
            # the targets made layer-major in the (as yet unused) buffer of the backward pass: a float32 temporary of
            # this size would be a fresh allocation each step, and those stall on page faults and compaction
            layer_major = weights.workspace("grad_low", (L, B, d), weights.dtype)
            out -= (
                layer_major.copy_(targets.transpose(0, 1))
                if targets.dtype == weights.dtype
                else targets.transpose(0, 1)
            )
        per_layer = torch.linalg.vector_norm(out, dim=(1, 2)).square() / (B * d)
        ctx.save_for_backward(values, acts.tokens, acts.features, *acts.by_feature)
        ctx.ptr, ctx.weights, ctx.error = acts.ptr, weights, out
        return per_layer

    @staticmethod
    def backward(ctx: Any, grad_per_layer: torch.Tensor) -> tuple[Any, ...]:
        values, tokens, features, order_all, tokens_by_f, bounds = ctx.saved_tensors
        weights, grad = ctx.weights, ctx.error
        W_dec = weights.W_dec
        L, B, d = grad.shape
        Fl = W_dec[0].shape[1]
        grad.mul_((2 / (B * d)) * grad_per_layer[:, None, None])  # the error becomes d(loss)/d(reconstruction)
        grad_b_dec = grad.sum(dim=1)
        g_low = weights.workspace("grad_low", (L, B, d), weights.dtype)
        g_low.copy_(grad)
        grad_values = torch.empty_like(values)  # every layer's part is written below
        compiled = kernels.available(W_dec[0])
        for s in range(L):
            part = slice(ctx.ptr[s], ctx.ptr[s + 1])
            f, tok, v = features[part], tokens[part], values[part]
            order, tok_by_f = order_all[part], tokens_by_f[part]
            v_by_f = v[order]
            dW = weights.grad_buffer(1 + s)
            targets = slice(s, s + W_dec[s].shape[0])  # s..L-1, or s alone for a per-layer transcoder
            if compiled:  # the activations' gradients from the bf16 loss gradient here
                by_f = kernels.decoder_backward(g_low[targets], W_dec[s], dW, bounds[s], tok_by_f, v_by_f)
                grad_values[part] = torch.empty_like(by_f).index_copy_(0, order, by_f)
                continue
            f_offsets = bounds[s, :-1]
            acc = torch.zeros(len(f), dtype=torch.float32, device=values.device)
            dots = SampledDots(tok, f, B, Fl)
            for j in range(W_dec[s].shape[0]):
                acc += dots(grad[s + j], W_dec[s][j])
                dW[j] = gather_sum(g_low[s + j], tok_by_f, f_offsets, v_by_f)
            grad_values[part] = acc
        return grad_values, grad_b_dec, None, None, None, None


def encode(x: torch.Tensor, weights: ComputeWeights, b_enc: torch.Tensor, select: Selector) -> SparseActs:
    """Normalised inputs `[B, L, d]` -> the active entries."""
    B, L, d = x.shape  # layer-major rows: bf16 matmuls on strided rows leave oneDNN's fast path
    xl = weights.workspace("inputs", (L, B, d), weights.dtype) if torch.is_grad_enabled() else None
    xl = xl.copy_(x.transpose(0, 1)) if xl is not None else x.transpose(0, 1).to(weights.dtype).contiguous()
    values, tokens, features, sizes, order, tokens_by_f, bounds = _Encode.apply(xl, b_enc, weights, select)
    ptr = [0]
    for n in sizes.tolist():
        ptr.append(ptr[-1] + n)
    return SparseActs(values, tokens, features, tuple(ptr), ByFeature(order, tokens_by_f, bounds))


@torch.no_grad()
def decode(
    acts: SparseActs, weights: ComputeWeights, b_dec: torch.Tensor, shards: FeatureShards, batch: int
) -> torch.Tensor:
    """Active entries -> reconstruction `[B, L, d]` summed over feature shards, `b_dec` included, float32 (for
    evaluation: no gradient)."""
    L, d = b_dec.shape
    out = torch.zeros(L, batch, d, dtype=torch.float32, device=b_dec.device)
    _decode_into(out, acts.values, acts, weights)
    out = shards.sum_partials(out) + b_dec[:, None]
    return out.transpose(0, 1).contiguous()


def reconstruction_loss(
    acts: SparseActs, targets: torch.Tensor, b_dec: torch.Tensor, weights: ComputeWeights, shards: FeatureShards
) -> torch.Tensor:
    """Σ_l MSE(ŷ_l, y_l) (mean over tokens and dimensions) per layer `[L]` of the active entries' reconstruction
    of `targets [B, L, d]`; differentiable in the entries' values, `b_dec` and (into `weights`' buffers) the
    decoders."""
    return _DecodeLoss.apply(acts.values, b_dec, acts, targets, weights, shards)
