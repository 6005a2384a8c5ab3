"""Spliced-in evaluation: the language model with its MLP outputs replaced by the CLT's reconstruction (the
"replacement model" of Circuit Tracing), on real text, through nnsight.

All layers at once: at each layer in order, the MLP input of the spliced run itself is normalised and encoded, and
the MLP output becomes the de-normalised sum of the decoders of that layer's and every earlier layer's features,
plus the decoder bias (of that layer's features alone for a per-layer transcoder, `decoders: per_layer`). One layer
at a time (`per_layer`): only layer l's output is replaced, by the reconstruction from the original run's inputs
(its zero-ablation baseline zeroes that layer alone). Positions the CLT never trained
on (BOS and special tokens, which extraction keeps out of the store) keep their true MLP output, in the spliced and
the zero-ablated runs alike, and are not encoded at all. batchtopk models keep, at each layer, the k·N largest
pre-activations over the N kept tokens of the forward pass (`text_batch_size` windows), as in training, so a token's
features depend on the batch it is evaluated in; topk models keep k per token. Only `topk_scope: per_layer` can be
spliced: a global k spans layers the spliced run has not reached yet (convert such a model to JumpReLU first).

The replacement is a plain function `(layer, MLP input, true MLP output) -> output to splice in`, so tests can splice
in an oracle (the true output: nothing changes) or zeros (zero-ablation) through the very same code path.

Reported over every next-token prediction: the original, spliced and zero-ablation cross-entropy, the fraction of
CE recovered `(CE_zero − CE_spliced) / (CE_zero − CE_orig)`, the mean KL(original ‖ spliced) per token and the
top-1 agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clt_core.data.sampler import Normalizer
from clt_core.errors import ConfigError
from clt_core.lm.capture import CapturePoints, module_at, traced
from clt_core.lm.windows import PackedWindow
from clt_core.model.clt import CrossLayerTranscoder

Replacement = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""`(layer, MLP input [B, T, d], true MLP output [B, T, d]) -> the output to splice in`, called in layer order."""


class CLTReplacement:
    """The CLT as a `Replacement` for one batch; `reset(keep)` before each forward pass. Only the kept positions
    (`keep [B, T]`) are encoded: BOS rows, with their outsized activations, never compete for a batch's top k."""

    def __init__(self, model: CrossLayerTranscoder, normalizer: Normalizer | None) -> None:
        cfg = model.config
        if cfg.activation_fn in ("batchtopk", "topk") and cfg.topk_scope == "global":
            raise ConfigError(
                f"a {cfg.activation_fn} model with a global k cannot be spliced in layer by layer; convert it to "
                "JumpReLU first (clt convert)"
            )
        self.model = model
        device = model.W_enc.device
        self.stats = None if normalizer is None else tuple(
            t.to(device) for t in (normalizer.inputs_mean, normalizer.inputs_std, normalizer.targets_mean,
                                   normalizer.targets_std)
        )  # fmt: skip
        self.partial: torch.Tensor | None = None  # [N_kept, L, d]: decoded so far, normalised units
        self.keep: torch.Tensor | None = None

    def reset(self, keep: torch.Tensor) -> CLTReplacement:
        self.partial, self.keep = None, keep.reshape(-1)
        return self

    def features(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Raw MLP inputs `[N, d]` of one layer -> its feature activations `[N, F]`."""
        m = self.model
        x = x.to(m.W_enc.device, torch.float32)
        if self.stats is not None:
            x = (x - self.stats[0][layer]) / self.stats[1][layer]
        return m.activate_layer(layer, m.encode_layer(layer, x))

    def add_features(self, layer: int, acts: torch.Tensor) -> None:
        m = self.model
        L, d = m.num_layers, m.d_model
        targets = m.decoder_targets[layer]
        if self.partial is None:
            self.partial = torch.zeros(acts.shape[0], L, d, device=acts.device)
        self.partial[:, targets.start : targets.stop] += m.decode_layer(layer, acts).reshape(-1, len(targets), d)

    def output(self, layer: int) -> torch.Tensor:
        """The raw reconstruction `[N, d]` of layer `layer` from the features added so far."""
        if self.partial is None:
            raise RuntimeError("CLTReplacement.output before any add_features since reset: no features to decode")
        y = self.partial[:, layer] + self.model.b_dec[layer]
        return y if self.stats is None else y * self.stats[3][layer] + self.stats[2][layer]

    def __call__(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.add_features(layer, self.features(layer, x.reshape(-1, x.shape[-1])[self.keep]))
        return self._scatter(self.output(layer), y)

    def _scatter(self, kept: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = y.reshape(-1, y.shape[-1]).clone()
        out[self.keep] = kept.to(y.device, y.dtype)
        return out.reshape(y.shape)


class SplicedRunner:
    """Runs the language model through nnsight, optionally with MLP outputs replaced."""

    def __init__(self, lm: torch.nn.Module, points: CapturePoints) -> None:
        self.traced, self.points = traced(lm), points

    def _module(self, name: str) -> Any:
        return module_at(self.traced, name)

    @torch.no_grad()
    def logits(
        self,
        input_ids: torch.Tensor,
        keep: torch.Tensor,
        replace: Replacement | None = None,
        layers: Iterable[int] | None = None,
        record_inputs: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits `[B, T, V]` with `replace` spliced in at `layers` (default all) where `keep [B, T]`; with
        `record_inputs`, also every layer's MLP input as the run saw it."""
        p = self.points
        chosen = set(range(p.num_layers) if layers is None else layers)
        mask = keep[..., None]
        inputs: list[Any] = []
        from nnsight import save

        with self.traced.trace(input_ids):
            for layer in range(p.num_layers):
                source, sink = self._module(p.input_name(layer)), self._module(p.output_name(layer))
                x = getattr(source, p.input_kind)
                if record_inputs:
                    inputs.append(save(x))
                if replace is not None and layer in chosen:
                    y = sink.output
                    sink.output = torch.where(mask, replace(layer, x, y), y)
            out = save(self.traced.output)
        return out.logits.float(), [torch.as_tensor(t) for t in inputs]


@dataclass
class SplicedTotals:
    """Running sums over next-token predictions."""

    predictions: int = 0
    ce_original: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, original: torch.Tensor, spliced: torch.Tensor, zero: torch.Tensor, ids: torch.Tensor) -> None:
        labels = ids[:, 1:].reshape(-1)
        logp = [F.log_softmax(t[:, :-1].reshape(-1, t.shape[-1]).double(), dim=-1) for t in (original, spliced, zero)]
        ce = [float(-lp.gather(1, labels[:, None]).sum()) for lp in logp]
        self.ce_original += ce[0]
        self.ce_spliced += ce[1]
        self.ce_zero += ce[2]
        self.kl += float((logp[0].exp() * (logp[0] - logp[1])).sum())
        self.agree += int((logp[0].argmax(-1) == logp[1].argmax(-1)).sum())
        self.predictions += labels.numel()

    def result(self) -> dict[str, float]:
        n = max(self.predictions, 1)
        orig, spliced, zero = self.ce_original / n, self.ce_spliced / n, self.ce_zero / n
        gap = zero - orig
        return {
            "predictions": self.predictions,
            "ce_original": orig,
            "ce_spliced": spliced,
            "ce_zero_ablation": zero,
            "ce_recovered": (zero - spliced) / gap if abs(gap) > 1e-12 else float("nan"),
            "kl_per_token": self.kl / n,
            "top1_agreement": self.agree / n,
        }


def zero_replacement(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(y)


def spliced_metrics(
    lm: torch.nn.Module,
    points: CapturePoints,
    windows: Iterable[list[PackedWindow]],
    replacement_for_batch: Callable[[torch.Tensor], Replacement],
    *,
    per_layer: CLTReplacement | None = None,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """CE/KL/agreement of the all-layers splice over batches of windows (`replacement_for_batch(keep)` gives the
    batch's replacement); with `per_layer` (a CLTReplacement) also each layer replaced alone."""
    runner = SplicedRunner(lm, points)
    totals = SplicedTotals()
    layer_totals = [SplicedTotals() for _ in range(points.num_layers)] if per_layer is not None else []
    device = next(lm.parameters()).device
    for batch in tqdm(windows, desc="spliced eval", unit="batch", total=total, disable=not progress):
        ids = torch.as_tensor(np.stack([w.token_ids for w in batch]), device=device)
        keep = torch.as_tensor(np.stack([w.keep for w in batch]), device=device)
        original, inputs = runner.logits(ids, keep, record_inputs=per_layer is not None)
        zero, _ = runner.logits(ids, keep, zero_replacement)
        spliced, _ = runner.logits(ids, keep, replacement_for_batch(keep))
        totals.add(original, spliced, zero, ids)
        if per_layer is None:
            continue
        for layer, sums in enumerate(layer_totals):
            only, _ = runner.logits(ids, keep, _from_original(per_layer, keep, inputs, layer), layers=[layer])
            zero_one, _ = runner.logits(ids, keep, zero_replacement, layers=[layer])
            sums.add(original, only, zero_one, ids)
    result: dict[str, Any] = totals.result()
    if layer_totals:
        result["per_layer"] = [s.result() for s in layer_totals]
    return result


def _from_original(clt: CLTReplacement, keep: torch.Tensor, inputs: list[torch.Tensor], target: int) -> Replacement:
    """Layer `target`'s reconstruction from the original run's inputs of the layers that write to it (0..target; for
    a per-layer transcoder, `target` alone)."""
    writers = [s for s, targets in enumerate(clt.model.decoder_targets[: target + 1]) if target in targets]

    def replace(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        clt.reset(keep)
        for source in writers:
            rows = inputs[source].reshape(-1, inputs[source].shape[-1])[clt.keep]
            clt.add_features(source, clt.features(source, rows))
        return clt._scatter(clt.output(target), y)

    return replace


def language_model_of(trained: Any, spec: str | None = None, *, progress: bool = True) -> tuple[Any, Any, str]:
    """The language model a model directory's CLT was trained on (or `spec`), in float32 on the CLT's device, with
    its capture points: `(LoadedModel, CapturePoints, spec)`; one line of error when it is unknown or of another
    shape."""
    from clt_core.lm.capture import capture_points
    from clt_core.lm.loading import resolve_model

    model, store = trained.model, trained.store_info
    spec = spec or store.get("model", {}).get("name")
    if spec is None:
        raise ConfigError(f"{trained.path} does not say which language model it was trained on; pass --model")
    lm = resolve_model(spec, dtype=torch.float32, device=str(model.W_enc.device), progress=progress)
    hooks = store.get("hook_templates", {})
    points = capture_points(lm.model, hooks.get("input_template"), hooks.get("output_template"),
                            input_kind=hooks.get("input_kind"), output_kind=hooks.get("output_kind"))  # fmt: skip
    if (points.num_layers, lm.d_model) != (model.config.num_layers, model.config.d_model):
        raise ConfigError(
            f"{spec} has {points.num_layers} layers of width {lm.d_model}; the CLT {model.config.num_layers} of "
            f"width {model.config.d_model}"
        )
    return lm, points, spec
