"""circuit-tracer's cross-layer transcoder files, with our normalisation folded in so they work on raw activations.

Layout (what `circuit_tracer.transcoder.cross_layer_transcoder.load_clt` reads): per layer i,
`W_enc_{i}.safetensors` holding `W_enc_{i} [F, d]`, `b_enc_{i} [F]`, `b_dec_{i} [d]` and, for JumpReLU,
`threshold_{i} [F]` (raw, not log), and `W_dec_{i}.safetensors` holding `W_dec_{i} [F, L-i, d]`; plus `config.yaml`
(`model_kind: cross_layer_transcoder`, `model_name`, hooks). circuit-tracer picks JumpReLU when thresholds are
present and ReLU otherwise, so relu models export without thresholds and batchtopk/topk models must be converted
first. Hooks: `mlp.hook_in` / `mlp.hook_out`, circuit-tracer's names for the MLP input (after the pre-MLP norm) and
output on its TransformerLens backend, which are exactly what we capture; the module templates we captured with
are kept as `clt_hook_templates` for its nnsight backend.

Folding, per layer (x raw input, μ/σ the normalisation): pre = W_enc·(x−μ_in)/σ_in + b_enc, so W_enc' = W_enc/σ_in
and b_enc' = b_enc − W_enc·(μ_in/σ_in); the reconstruction σ_t·ŷ + μ_t gives W_dec'[s][:, j] = W_dec[s][:, j]·σ_t[s+j]
and b_dec' = σ_t·b_dec + μ_t. Thresholds act on pre-activations, which do not change. Computed in float64.
The export also keeps our `config.json` and `source.json`, so `load_export` rebuilds a native model (on raw
activations) from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from clt_core.data.sampler import Normalizer
from clt_core.errors import ConfigError
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.train.checkpoint import SOURCE_FILE, load_model, read_normalizer, read_source

INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"


def folded_weights(model: CrossLayerTranscoder, normalizer: Normalizer | None) -> dict[str, Any]:
    """`W_enc [L,F,d]`, `b_enc [L,F]`, `W_dec` (list of `[F,L-s,d]`), `b_dec [L,d]` on raw activations (float32)."""
    f64 = torch.float64
    W_enc, b_enc = model.W_enc.detach().to(f64), model.b_enc.detach().to(f64)
    W_dec = [w.detach().to(f64) for w in model.W_dec]
    b_dec = model.b_dec.detach().to(f64)
    if normalizer is not None:
        mu_in, sd_in = normalizer.inputs_mean.to(f64), normalizer.inputs_std.to(f64)
        mu_t, sd_t = normalizer.targets_mean.to(f64), normalizer.targets_std.to(f64)
        b_enc = b_enc - torch.einsum("lfd,ld->lf", W_enc, mu_in / sd_in)
        W_enc = W_enc / sd_in[:, None, :]
        W_dec = [w * sd_t[s:][None] for s, w in enumerate(W_dec)]
        b_dec = b_dec * sd_t + mu_t
    f32 = torch.float32
    return {"W_enc": W_enc.to(f32), "b_enc": b_enc.to(f32), "W_dec": [w.to(f32) for w in W_dec], "b_dec": b_dec.to(f32)}


def export_circuit_tracer(model_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the circuit-tracer files of the model in `model_dir` to `out` (atomically: whole or absent)."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    model = load_model(model_dir)
    kind = model.config.activation_fn
    if kind in ("batchtopk", "topk"):
        raise ConfigError(
            f"{model_dir} is a {kind} model, which circuit-tracer cannot run (it knows JumpReLU and ReLU); "
            f"convert it first: clt convert {model_dir} --out DIR"
        )
    source = read_source(model_dir)
    weights = folded_weights(model, read_normalizer(model_dir))
    store = source.get("store", {})
    tmp = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in range(model.config.num_layers):
        encoder = {
            f"W_enc_{i}": weights["W_enc"][i],
            f"b_enc_{i}": weights["b_enc"][i],
            f"b_dec_{i}": weights["b_dec"][i],
        }
        if kind == "jumprelu":
            encoder[f"threshold_{i}"] = model.threshold.detach()[i].float()
        save_file({k: v.contiguous() for k, v in encoder.items()}, str(tmp / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": weights["W_dec"][i].contiguous()}, str(tmp / f"W_dec_{i}.safetensors"))
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": store.get("model", {}).get("name"),
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
        "clt_hook_templates": store.get("hook_templates", {}),
        "activation_function": "jump_relu" if kind == "jumprelu" else "relu",
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp / "config.json").write_text(model.config.model_dump_json(indent=2))
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_export(path: str | Path) -> CrossLayerTranscoder:
    """A native model from a circuit-tracer export. It works on raw activations (the normalisation is folded into
    its weights), so it needs no `normalization.safetensors`; its outputs equal the original model's de-normalised
    ones to float32 rounding."""
    path = Path(path)
    try:
        config = CLTConfig.model_validate_json((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not an export of ours (no config.json)") from None
    model = CrossLayerTranscoder(config)
    with torch.no_grad():
        for i in range(config.num_layers):
            enc = load_file(str(path / f"W_enc_{i}.safetensors"))
            model.W_enc[i] = enc[f"W_enc_{i}"]
            model.b_enc[i] = enc[f"b_enc_{i}"]
            model.b_dec[i] = enc[f"b_dec_{i}"]
            if model.log_threshold is not None:
                model.log_threshold[i] = enc[f"threshold_{i}"].log()
            model.W_dec[i].copy_(load_file(str(path / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"])
    return model
