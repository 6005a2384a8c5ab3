"""circuit-tracer's cross-layer transcoder files (and, for a per-layer model, its transcoder-set files), with our
normalisation folded in so they work on raw activations.

What circuit-tracer 0.5 reads (checked in its source, `circuit_tracer/transcoder/cross_layer_transcoder.py` and
`utils/caching.py`, `utils/hf_utils.py`, `utils/tl_nnsight_mapping.py`):
- `load_clt(dir, feature_input_hook, feature_output_hook, ...)` counts the layers as the `W_enc_*.safetensors` files;
  `W_enc_{i}.safetensors` holds `W_enc_{i} [F, d]`, `b_enc_{i} [F]`, `b_dec_{i} [d]` and, for JumpReLU,
  `threshold_{i} [F]` (the raw threshold: features = pre·(pre > θ)); `W_dec_{i}.safetensors` holds
  `W_dec_{i} [F, L-i, d]` (target layers i..L-1), exactly our layout. It picks JumpReLU when `threshold_0` is present
  and ReLU otherwise; it has no top-k CLT. So relu models export without thresholds, and batchtopk/topk models are
  refused ("convert to JumpReLU first": `clt convert` turns them into JumpReLU).
- Thresholds are cast to the replacement model's dtype and applied as `pre·(pre > θ)` with no ReLU, so a θ ≤ 0 would
  let negative pre-activations through. Ours are exp(log θ) > 0, but exp underflows to 0 in float32 below log θ ≈
  −103 (and float16 flushes θ < 6e-8 to 0): thresholds are stored float32, clamped up to `MIN_THRESHOLD` (1e-6, the
  floor `clt convert` uses, positive in float32, bfloat16 and float16) with a warning naming how many; a NaN threshold
  is refused. +inf (a feature that never fires) is kept.
- `W_skip [L, d, d]` (an affine skip connection) is read when present; our CLT has no skip connection, so the export
  never writes one, and circuit-tracer's replacement model runs with `skip_connection=False`.
- A per-layer model (`decoders: per_layer`) is what circuit-tracer calls a transcoder set, of another format
  (`single_layer_transcoder.py`, `load_transcoder_set` / `load_relu_transcoder`): one `layer_{i}.safetensors` per
  layer holding `W_enc [F, d]`, `W_dec [F, d]`, `b_enc [F]`, `b_dec [d]` and, for JumpReLU,
  `activation_function.threshold [F]` (the raw threshold; ReLU without it), as `SingleLayerTranscoder.to_safetensors`
  writes them. `load_transcoders_from_cache` finds the layers as `layer_*.safetensors`.
- `config.yaml` is read when the directory is loaded through circuit-tracer's cache (or a Hugging Face repo):
  `model_kind` (`cross_layer_transcoder`, or `transcoder_set` for a per-layer model), `feature_input_hook`,
  `feature_output_hook`; its CLI takes the language model from `model_name`. Other keys are ignored; ours
  (`activation_function`, `clt_pipeline`) are for people.
- Hooks are TransformerLens-style names relative to a block. On its TransformerLens backend circuit-tracer wraps every
  MLP so that `mlp.hook_in` is the MLP's input and `mlp.hook_out` its output; its nnsight backend maps these names to
  modules per architecture (Llama and Qwen3: `mlp.hook_in` = `post_attention_layernorm` output = the MLP input,
  `mlp.hook_out` = the `mlp` output; Gemma 2/3: `hook_mlp_out` = `post_feedforward_layernorm` output). We capture the
  MLP's input and output (the architecture presets of `clt_core.lm.capture`), so a Llama model exports with
  `mlp.hook_in` / `mlp.hook_out`; a Gemma target after the post-MLP norm exports as `hook_mlp_out`. Templates that map
  to no circuit-tracer hook are refused unless the hooks are given.

Folding, per layer (x raw input, μ/σ the normalisation): pre = W_enc·(x−μ_in)/σ_in + b_enc, so W_enc' = W_enc/σ_in
and b_enc' = b_enc − W_enc·(μ_in/σ_in); the raw reconstruction σ_t·ŷ + μ_t gives
W_dec'[s][:, j] = W_dec[s][:, j]·σ_t[s+j] (j over the decoder's targets from s on) and b_dec' = σ_t·b_dec + μ_t.
Thresholds act on pre-activations, which do not change. Computed in float64, stored in float32.

The export also keeps our `config.json` and `source.json`, so `load_circuit_tracer` rebuilds a native model from it;
that model works on raw activations (its normalisation is the identity: it is folded into the weights).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from clt_core.data.sampler import Normalizer
from clt_core.errors import ConfigError
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import SOURCE_FILE, load, read_config, read_source

log = logging.getLogger(__name__)

INPUT_HOOK, OUTPUT_HOOK, NORMED_OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out", "hook_mlp_out"
MIN_THRESHOLD = 1e-6
"""Smallest JumpReLU threshold written (as `clt convert`'s floor): positive in float32, bfloat16 and float16."""
# (module path after "{layer}.", input|output) of our capture templates -> circuit-tracer's hook name.
_INPUT_HOOKS = {
    ("mlp", "input"): INPUT_HOOK,  # Llama, Qwen, Mistral, Gemma, GPT-NeoX presets
    ("mlp.c_fc", "input"): INPUT_HOOK,  # GPT-2 preset
    ("pre_feedforward_layernorm", "output"): INPUT_HOOK,  # Gemma 2/3: the MLP's input
}
_OUTPUT_HOOKS = {
    ("mlp", "output"): OUTPUT_HOOK,
    ("mlp.c_proj", "output"): OUTPUT_HOOK,  # GPT-2 (dropout after c_proj is the identity in eval mode)
    ("post_feedforward_layernorm", "output"): NORMED_OUTPUT_HOOK,  # Gemma 2/3 preset: the normed MLP output
}


def fold_normalization(state: dict[str, torch.Tensor], normalizer: Normalizer | None) -> dict[str, torch.Tensor]:
    """Our parameters (`model.safetensors` names: `W_enc [L,F,d]`, `b_enc [L,F]`, `W_dec.{s} [F,T_s,d]` writing
    to targets s..s+T_s-1, `b_dec [L,d]`, optional `log_threshold`) trained behind `normalizer` -> the same on raw
    activations, float32.

    Pure; computed in float64 one tensor at a time (a large CLT's decoders do not fit twice in float64)."""
    f32, f64 = torch.float32, torch.float64
    if normalizer is None:
        return {name: value.detach().to(f32, copy=True) for name, value in state.items()}
    mu_in, sd_in = normalizer.inputs_mean.to(f64), normalizer.inputs_std.to(f64)
    mu_t, sd_t = normalizer.targets_mean.to(f64), normalizer.targets_std.to(f64)
    W_enc = state["W_enc"].detach().to(f64)
    out = {
        "W_enc": (W_enc / sd_in[:, None, :]).to(f32),
        "b_enc": (state["b_enc"].detach().to(f64) - torch.einsum("lfd,ld->lf", W_enc, mu_in / sd_in)).to(f32),
        "b_dec": (state["b_dec"].detach().to(f64) * sd_t + mu_t).to(f32),
    }
    del W_enc
    for name, value in state.items():
        if name.startswith("W_dec."):
            s = int(name.split(".")[1])
            out[name] = (value.detach().to(f64) * sd_t[s : s + value.shape[1]][None]).to(f32)
        elif name not in out:
            out[name] = value.detach().to(f32, copy=True)  # log_threshold: pre-activations are unchanged
    return out


def circuit_tracer_hooks(hook_templates: dict[str, Any]) -> tuple[str, str]:
    """circuit-tracer's `(feature_input_hook, feature_output_hook)` for the modules a store was captured from."""
    if not hook_templates:
        log.warning("the model's source records no capture templates; assuming the MLP input and output")
        return INPUT_HOOK, OUTPUT_HOOK

    def lookup(role: str, table: dict[tuple[str, str], str]) -> str | None:
        template = str(hook_templates.get(f"{role}_template", ""))
        kind = str(hook_templates.get(f"{role}_kind", "input" if role == "input" else "output"))
        return table.get((template.partition("{layer}.")[2], kind))

    hooks = lookup("input", _INPUT_HOOKS), lookup("output", _OUTPUT_HOOKS)
    if hooks[0] is None or hooks[1] is None:
        captured = f"{hook_templates.get('input_template')} -> {hook_templates.get('output_template')}"
        raise ConfigError(
            f"the model was trained on {captured}, which has no circuit-tracer hook name known here; pass "
            f"--input-hook and --output-hook (e.g. {INPUT_HOOK} and {OUTPUT_HOOK})"
        )
    return hooks[0], hooks[1]


def export_circuit_tracer(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    input_hook: str | None = None,
    output_hook: str | None = None,
) -> Path:
    """Write the circuit-tracer files of the model in `model_dir` to `out_dir` (atomically: whole or absent).

    Hooks default to those matching the model's capture templates (see the module docstring)."""
    model_dir, out = Path(model_dir), Path(out_dir)
    config = read_config(model_dir)
    kind = config.activation_fn
    if kind in ("batchtopk", "topk"):
        raise ConfigError(
            f"{model_dir} is a {kind} model, which circuit-tracer cannot run (it knows JumpReLU and ReLU); "
            f"convert to JumpReLU first: clt convert {model_dir} --out DIR, then use DIR"
        )
    if out.resolve() == model_dir.resolve():
        raise ConfigError(f"--out {out} is the model directory itself; choose another directory")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    source = read_source(model_dir)
    store = source.get("store", {})
    if input_hook is None or output_hook is None:
        hooks = circuit_tracer_hooks(store.get("hook_templates", {}))
        input_hook, output_hook = input_hook or hooks[0], output_hook or hooks[1]
    model, normalizer, _, _ = load(model_dir)
    state = fold_normalization(dict(model.named_parameters()), normalizer)
    num_layers = model.num_layers
    del model

    thresholds = positive_thresholds(state["log_threshold"], model_dir) if kind == "jumprelu" else None
    per_layer = config.decoders == "per_layer"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # mkdir, unlike mkdtemp, keeps umask
    tmp.mkdir()
    try:
        for i in range(num_layers):
            threshold = None if thresholds is None else thresholds[i]
            if per_layer:
                _save_layer(tmp / f"layer_{i}.safetensors", state, i, threshold)
                continue
            encoder = {
                f"W_enc_{i}": state["W_enc"][i],
                f"b_enc_{i}": state["b_enc"][i],
                f"b_dec_{i}": state["b_dec"][i],
            }
            if threshold is not None:
                encoder[f"threshold_{i}"] = threshold
            save_file({k: v.contiguous() for k, v in encoder.items()}, str(tmp / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": state[f"W_dec.{i}"].contiguous()}, str(tmp / f"W_dec_{i}.safetensors"))
        ct_config: dict[str, Any] = {"model_kind": "transcoder_set" if per_layer else "cross_layer_transcoder"}
        if store.get("model", {}).get("name"):
            ct_config["model_name"] = store["model"]["name"]
        ct_config |= {
            "feature_input_hook": input_hook,
            "feature_output_hook": output_hook,
            "activation_function": "jump_relu" if kind == "jumprelu" else "relu",
            "clt_pipeline": {
                "data": source.get("data"),
                "hook_templates": store.get("hook_templates", {}),
                "normalization_folded": normalizer is not None,
            },
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(ct_config, sort_keys=False))
        (tmp / "config.json").write_text(config.model_dump_json(indent=2))
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def positive_thresholds(log_threshold: torch.Tensor, model_dir: Path | str = "the model") -> torch.Tensor:
    """`exp(log θ)` in float32 (exactly the threshold our forward compares against), at least `MIN_THRESHOLD`.

    circuit-tracer computes `pre·(pre > θ)` without a ReLU, so θ ≤ 0 (an underflowed exp) would pass negative
    pre-activations: such thresholds are raised to `MIN_THRESHOLD` with a warning. NaN is refused."""
    threshold = log_threshold.detach().to(torch.float32).exp()
    if torch.isnan(threshold).any():
        bad = torch.isnan(threshold).nonzero()[0].tolist()
        raise ConfigError(
            f"{model_dir}: {int(torch.isnan(threshold).sum())} JumpReLU thresholds are NaN (first: layer {bad[0]}, "
            f"feature {bad[1]}); the model is broken: convert or train it again"
        )
    low = threshold < MIN_THRESHOLD
    if low.any():
        per_layer = {int(layer): int(n) for layer, n in enumerate(low.sum(dim=1).tolist()) if n}
        log.warning(
            "%s: %d JumpReLU thresholds below %g (per layer: %s) raised to %g: circuit-tracer applies x*(x>θ) "
            "without a ReLU, so θ <= 0 would pass negative pre-activations",
            model_dir, int(low.sum()), MIN_THRESHOLD, per_layer, MIN_THRESHOLD,
        )  # fmt: skip
        threshold = threshold.clamp_min(MIN_THRESHOLD)
    return threshold


def _save_layer(file: Path, state: dict[str, torch.Tensor], layer: int, threshold: torch.Tensor | None) -> None:
    """One layer of a per-layer model as circuit-tracer's `SingleLayerTranscoder.to_safetensors` writes it."""
    tensors = {
        "W_enc": state["W_enc"][layer],
        "W_dec": state[f"W_dec.{layer}"][:, 0],
        "b_enc": state["b_enc"][layer],
        "b_dec": state["b_dec"][layer],
    }
    if threshold is not None:
        tensors["activation_function.threshold"] = threshold
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def load_circuit_tracer(export_dir: str | Path) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """A native model and its `source.json` from one of our circuit-tracer exports.

    The model works on RAW activations: its normalisation is folded into the weights, so it needs no
    `normalization.safetensors` (save it with `model.directory.save(dir, model, normalizer=None, source=source)`). Its
    raw reconstruction equals the original model's de-normalised one to float32 rounding."""
    path = Path(export_dir)
    try:
        config = CLTConfig.model_validate_json((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not a clt export (no config.json); export a model with `clt export` first"
        ) from None
    model = CrossLayerTranscoder(config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i in range(model.num_layers):
            if config.decoders == "per_layer":  # circuit-tracer's transcoder set: one file per layer
                layer = _read(path / f"layer_{i}.safetensors")
                names = {"W_enc": "W_enc", "b_enc": "b_enc", "b_dec": "b_dec", f"W_dec.{i}": "W_dec"}
                values = {ours: layer.get(theirs) for ours, theirs in names.items()}
                W_dec = values[f"W_dec.{i}"]
                values[f"W_dec.{i}"] = None if W_dec is None else W_dec[:, None]
                threshold = layer.get("activation_function.threshold")
            else:
                enc, dec = _read(path / f"W_enc_{i}.safetensors"), _read(path / f"W_dec_{i}.safetensors")
                values = {n: enc.get(f"{n}_{i}") for n in ("W_enc", "b_enc", "b_dec")}
                values[f"W_dec.{i}"] = dec.get(f"W_dec_{i}")
                threshold = enc.get(f"threshold_{i}")
            if model.log_threshold is not None:
                values["log_threshold"] = None if threshold is None else threshold.double().log().float()
            for name, value in values.items():
                target = params[name] if name.startswith("W_dec.") else params[name][i]
                if value is None or value.shape != target.shape:
                    found = "missing" if value is None else f"shape {tuple(value.shape)}"
                    raise ConfigError(f"{path}: layer {i} {name} is {found}, config.json needs {tuple(target.shape)}")
                target.copy_(value)
    source = read_source(path)
    return model, source


def _read(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise ConfigError(f"{file.parent}: {file.name} is missing; re-export the model")
    return load_file(str(file))
