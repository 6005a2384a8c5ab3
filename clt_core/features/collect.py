"""Streaming per-feature statistics over a text: bounded state, whatever the number of tokens.

`FeatureCollector.add(windows, acts)` takes one forward batch: its windows and, per layer, the activations `[N, F]`
of the N kept positions (row-major over the windows' `keep` masks). Per layer and feature it keeps, on one device:

- `count` (nonzero activations), `act_min` (smallest nonzero) and `act_max`;
- a reservoir of `reservoir` nonzero token activations: the ones with the smallest random priorities so far, a
  uniform sample without replacement (all of them while the feature has fired at most `reservoir` times);
- the top `examples` windows by their largest activation (each window once), with that position and the feature's
  activations at every position of the window `[T]`;
- `quantile_bins × quantile_examples` windows stratified by their largest activation: equal-width bins over the
  running `[act_min, act_max]`, each keeping the `quantile_examples` windows of lowest random priority among those
  seen that fall in it; when the range widens, kept windows are re-binned (windows dropped earlier do not come back,
  so a bin's sample is uniform only once the range has settled), and every kept window lies in its bin of the final
  range.

Token ids are kept only for the windows some top or quantile slot still refers to (pruned as the stream goes), so
the state is about `L·F·(8·reservoir + (K + B·Q)·(4·T + 24))` bytes plus the ids of at most twice the referenced
windows (4·T bytes each): it does not grow with the tokens read (`state_bytes`). Per batch and layer the update
works on a dense `[F, windows, T]` copy of the batch's activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from clt_core.lm.windows import PackedWindow


@dataclass
class LayerState:
    """One layer's running statistics (`F` features; `R` reservoir, `K` top, `P` quantile slots, `T` positions)."""

    count: torch.Tensor  # [F] int64
    act_min: torch.Tensor  # [F] float32, +inf until the feature fires
    act_max: torch.Tensor  # [F] float32, 0 until it fires
    res_val: torch.Tensor  # [F, R] float32
    res_pri: torch.Tensor  # [F, R] float32; +inf: empty
    top_val: torch.Tensor  # [F, K] float32, descending; -inf: empty
    top_win: torch.Tensor  # [F, K] int64 window index; -1: empty
    top_pos: torch.Tensor  # [F, K] int64 position of the window's largest activation
    top_acts: torch.Tensor  # [F, K, T] float32
    q_val: torch.Tensor  # [F, P] float32
    q_pri: torch.Tensor  # [F, P] float32; +inf: empty
    q_win: torch.Tensor  # [F, P] int64; -1: empty
    q_pos: torch.Tensor  # [F, P] int64
    q_acts: torch.Tensor  # [F, P, T] float32

    @classmethod
    def empty(cls, F: int, R: int, K: int, P: int, T: int, device: torch.device) -> LayerState:
        def full(shape: tuple[int, ...], value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        i64, inf = torch.int64, float("inf")
        return cls(
            count=full((F,), 0, i64), act_min=full((F,), inf), act_max=full((F,), 0),
            res_val=full((F, R), 0), res_pri=full((F, R), inf),
            top_val=full((F, K), -inf), top_win=full((F, K), -1, i64), top_pos=full((F, K), 0, i64),
            top_acts=full((F, K, T), 0),
            q_val=full((F, P), 0), q_pri=full((F, P), inf), q_win=full((F, P), -1, i64), q_pos=full((F, P), 0, i64),
            q_acts=full((F, P, T), 0),
        )  # fmt: skip

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nelement() * getattr(self, f.name).element_size() for f in fields(self))


@dataclass
class FeatureResult:
    """One layer's statistics, on the CPU (`FeatureCollector.result`); empty slots removed per feature."""

    count: np.ndarray  # [F] int64
    act_min: np.ndarray  # [F] float32 (0 for dead features)
    act_max: np.ndarray  # [F] float32
    reservoir: list[np.ndarray]  # per feature: the sampled nonzero activations
    top: list[list[tuple[float, int, int, np.ndarray]]]  # per feature: (value, window, position, acts [T]), desc
    quantile: list[list[tuple[float, int, int, np.ndarray]]]  # per feature, by value descending


class FeatureCollector:
    """Running per-feature statistics of `num_layers × num_features` features over windows of `context_size`."""

    def __init__(
        self,
        num_layers: int,
        num_features: int,
        context_size: int,
        *,
        examples: int = 10,
        quantile_bins: int = 5,
        quantile_examples: int = 4,
        reservoir: int = 256,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        self.L, self.F, self.T = num_layers, num_features, context_size
        self.K, self.bins, self.Q, self.R = examples, quantile_bins, quantile_examples, reservoir
        self.P = quantile_bins * quantile_examples
        self.device = torch.device(device)
        self.layers = [LayerState.empty(self.F, self.R, self.K, self.P, self.T, self.device) for _ in range(self.L)]
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.window_tokens: dict[int, np.ndarray] = {}
        """Token ids (int32 `[T]`) of the windows slots may refer to, by window index."""
        self.tokens = 0
        """Kept positions read so far."""
        self.windows = 0
        self._referenced = 0

    def state_bytes(self) -> int:
        """Bytes held: every layer's tensors plus the token ids kept."""
        return sum(s.nbytes() for s in self.layers) + sum(a.nbytes for a in self.window_tokens.values())

    @torch.no_grad()
    def add(self, windows: Sequence[PackedWindow], acts: Sequence[torch.Tensor]) -> None:
        """One forward batch: `acts[l]` `[N, F]` are layer l's activations at the N kept positions of `windows`."""
        if len(acts) != self.L:
            raise ValueError(f"expected activations of {self.L} layers, got {len(acts)}")
        keep = torch.as_tensor(np.stack([w.keep for w in windows]), device=self.device)
        if keep.shape[1] != self.T:
            raise ValueError(f"windows of {keep.shape[1]} tokens, the collector was made for {self.T}")
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        win = torch.as_tensor([w.index for w in windows], dtype=torch.int64, device=self.device)
        for w in windows:
            self.window_tokens[w.index] = w.token_ids.astype(np.int32)
        for layer, a in enumerate(acts):
            if a.shape != (b_idx.numel(), self.F):
                raise ValueError(
                    f"layer {layer}: activations of shape {tuple(a.shape)}, expected {(b_idx.numel(), self.F)}"
                )
            dense = torch.zeros(self.F, len(windows), self.T, device=self.device)
            dense[:, b_idx, t_idx] = a.to(self.device, torch.float32).T
            self._add_layer(self.layers[layer], dense, win)
        self.tokens += int(b_idx.numel())
        self.windows += len(windows)
        if len(self.window_tokens) > 2 * self._referenced + 64:
            self.prune()

    def _add_layer(self, s: LayerState, dense: torch.Tensor, win: torch.Tensor) -> None:
        """`dense [F, B, T]`: the batch's activations (0 at positions not kept)."""
        F, B, T = dense.shape
        fires = dense > 0
        s.count += fires.sum((1, 2))
        s.act_max = torch.maximum(s.act_max, dense.amax((1, 2)))
        s.act_min = torch.minimum(s.act_min, torch.where(fires, dense, torch.inf).amin((1, 2)))

        if self.R:  # reservoir: the R smallest priorities among the kept and the new nonzero values
            flat, flat_fires = dense.reshape(F, B * T), fires.reshape(F, B * T)
            pri = torch.rand(F, B * T, generator=self.generator, device=self.device).masked_fill_(
                ~flat_fires, torch.inf
            )
            all_pri = torch.cat([s.res_pri, pri], 1)
            chosen = all_pri.topk(self.R, dim=1, largest=False).indices
            s.res_pri = all_pri.gather(1, chosen)
            s.res_val = torch.cat([s.res_val, flat], 1).gather(1, chosen)

        w_val, w_pos = dense.max(2)  # [F, B]: each window's largest activation and where
        w_fires = w_val > 0
        w_win = win.expand(F, B)

        # top windows
        values = torch.cat([s.top_val, w_val.masked_fill(~w_fires, -torch.inf)], 1)
        chosen = values.topk(self.K, dim=1).indices
        s.top_val = values.gather(1, chosen)
        empty = s.top_val == -torch.inf
        s.top_win = torch.cat([s.top_win, w_win], 1).gather(1, chosen).masked_fill_(empty, -1)
        s.top_pos = torch.cat([s.top_pos, w_pos], 1).gather(1, chosen)
        s.top_acts = torch.cat([s.top_acts, dense], 1).gather(1, chosen[..., None].expand(-1, -1, T))

        if not self.P:
            return
        # quantile strata: per bin of the current range, the Q lowest priorities
        values = torch.cat([s.q_val, w_val], 1)
        pri = torch.cat([s.q_pri, torch.rand(F, B, generator=self.generator, device=self.device)
                         .masked_fill_(~w_fires, torch.inf)], 1)  # fmt: skip
        M = values.shape[1]
        bins = quantile_bin(values, s.act_min[:, None], s.act_max[:, None], self.bins)
        bins = bins.masked_fill_(pri == torch.inf, self.bins)  # empty slots sort last
        order = pri.argsort(dim=1, stable=True)
        order = order.gather(1, bins.gather(1, order).argsort(dim=1, stable=True))  # by bin, then priority
        sorted_bins = bins.gather(1, order)
        first = torch.searchsorted(sorted_bins, sorted_bins)
        positions = torch.arange(M, device=self.device).expand(F, M)
        kept = (positions - first < self.Q) & (sorted_bins < self.bins)
        sel = torch.where(kept, positions, positions + M).topk(self.P, dim=1, largest=False).indices
        chosen, kept = order.gather(1, sel), kept.gather(1, sel)
        s.q_val = values.gather(1, chosen)
        s.q_pri = pri.gather(1, chosen).masked_fill_(~kept, torch.inf)
        s.q_win = torch.cat([s.q_win, w_win], 1).gather(1, chosen).masked_fill_(~kept, -1)
        s.q_pos = torch.cat([s.q_pos, w_pos], 1).gather(1, chosen)
        s.q_acts = torch.cat([s.q_acts, dense], 1).gather(1, chosen[..., None].expand(-1, -1, T))

    def referenced_windows(self) -> set[int]:
        ids = torch.cat([t for s in self.layers for t in (s.top_win.flatten(), s.q_win.flatten())])
        return {int(i) for i in ids.unique().tolist() if i >= 0}

    def prune(self) -> None:
        """Forget the token ids of windows no slot refers to any more."""
        keep = self.referenced_windows()
        self.window_tokens = {i: t for i, t in self.window_tokens.items() if i in keep}
        self._referenced = len(self.window_tokens)

    def result(self, layer: int) -> FeatureResult:
        """Layer `layer`'s statistics on the CPU."""
        s = self.layers[layer]
        count = s.count.cpu().numpy()
        res_val, res_ok = s.res_val.cpu().numpy(), torch.isfinite(s.res_pri).cpu().numpy()
        top = _slots(s.top_val, s.top_win, s.top_pos, s.top_acts)
        quantile = [sorted(q, key=lambda e: -e[0]) for q in _slots(s.q_val, s.q_win, s.q_pos, s.q_acts)]
        return FeatureResult(
            count=count,
            act_min=np.where(count > 0, s.act_min.cpu().numpy(), 0).astype(np.float32),
            act_max=s.act_max.cpu().numpy(),
            reservoir=[res_val[f][res_ok[f]] for f in range(self.F)],
            top=top,
            quantile=quantile,
        )


def quantile_bin(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """The bin (0 = lowest) of `values` among `bins` equal-width bins over `[lo, hi]`, `hi` in the last one (the
    viewer's histogram rule: ⌊(v − lo)/(hi − lo)·bins⌋ clamped); everything in bin 0 when `hi == lo`."""
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = torch.nan_to_num((values - lo) / width * bins, nan=0.0, posinf=0.0, neginf=0.0)
    return scaled.floor().clamp_(0, bins - 1).to(torch.int64)


def _slots(
    val: torch.Tensor, win: torch.Tensor, pos: torch.Tensor, acts: torch.Tensor
) -> list[list[tuple[float, int, int, np.ndarray]]]:
    v, w, p, a = (t.cpu().numpy() for t in (val, win, pos, acts))
    return [
        [(float(v[f, j]), int(w[f, j]), int(p[f, j]), a[f, j]) for j in range(v.shape[1]) if w[f, j] >= 0]
        for f in range(v.shape[0])
    ]
