"""Run by circuit-tracer's own venv (`make circuit-tracer-venv`; it pins transformers 4.57, so it cannot import us):
load one of our exports the ways circuit-tracer 0.5 does and write each one's reconstruction of raw inputs.

- `load_clt(dir, hooks from config.yaml, lazy_decoder=False)`: every decoder in memory;
- `load_clt(dir, ...)` with its default lazy decoder: decoder rows sliced from `W_dec_{i}.safetensors` on demand;
- `load_transcoders_from_cache(name, cache_dir=parent)`: circuit-tracer reads our `config.yaml` itself (model_kind,
  hooks) the way it reads a downloaded transcoder set, then calls `load_clt`.
An export of a per-layer model (`model_kind: transcoder_set`) is loaded with `load_transcoder_set` instead (eager,
lazy, and through the cache the same way), and reconstructs with its `decode(encode(x))`. For both kinds the lazy
model's `compute_attribution_components` (the sparse path attribution graphs use) gives a fourth reconstruction.

Usage: python circuit_tracer_check.py EXPORT_DIR INPUTS.safetensors OUT.safetensors
INPUTS holds `x [N, L, d]` (raw MLP inputs); OUT gets one `[N, L, d]` reconstruction per way, plus a JSON summary on
stdout (activation function, hooks, model name) for the caller to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from circuit_tracer.transcoder.single_layer_transcoder import TranscoderSet, load_transcoder_set
from circuit_tracer.utils.caching import load_transcoders_from_cache
from safetensors.torch import load_file, save_file


def reconstruct(clt: CrossLayerTranscoder | TranscoderSet, x: torch.Tensor) -> torch.Tensor:
    layer_first = x.transpose(0, 1).contiguous()  # circuit-tracer is layer-first
    with torch.no_grad():
        out = clt.decode(clt.encode(layer_first), layer_first) if isinstance(clt, TranscoderSet) else clt(layer_first)
    return out.transpose(0, 1).contiguous()


def attribution_reconstruction(clt: CrossLayerTranscoder | TranscoderSet, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction attribution works from: active features only, decoder rows read as attribution reads them
    (lazily, by feature), no position zeroed."""
    with torch.no_grad():
        parts = clt.compute_attribution_components(x.transpose(0, 1).contiguous(), zero_positions=slice(0, 0))
    return parts["reconstruction"].transpose(0, 1).contiguous()


def main() -> None:
    export, inputs, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    config = yaml.safe_load((export / "config.yaml").read_text())
    hooks = {"feature_input_hook": config["feature_input_hook"], "feature_output_hook": config["feature_output_hook"]}
    cpu, f32 = torch.device("cpu"), torch.float32
    x = load_file(inputs)["x"]
    if config["model_kind"] == "transcoder_set":
        layers = {int(f.stem.split("_")[1]): str(f) for f in export.glob("layer_*.safetensors")}
        eager: CrossLayerTranscoder | TranscoderSet = load_transcoder_set(
            layers, scan=str(export), **hooks, device=cpu, dtype=f32, lazy_encoder=False, lazy_decoder=False
        )
        lazy: CrossLayerTranscoder | TranscoderSet = load_transcoder_set(
            layers, scan=str(export), **hooks, device=cpu, dtype=f32
        )
        activation, d_model = eager[0].activation_function, eager[0].d_model
    else:
        eager = load_clt(str(export), **hooks, device=cpu, dtype=f32, lazy_decoder=False)
        lazy = load_clt(str(export), **hooks, device=cpu, dtype=f32)
        activation, d_model = eager.activation_function, eager.d_model
    cached, cached_config = load_transcoders_from_cache(export.name, cache_dir=export.parent, device=cpu, dtype=f32)
    ways = {name: reconstruct(clt, x) for name, clt in [("eager", eager), ("lazy", lazy), ("cached", cached)]}
    save_file({**ways, "attribution": attribution_reconstruction(lazy, x)}, out)
    summary = {
        "kind": type(cached).__name__,
        "activation": "jump_relu" if isinstance(activation, JumpReLU) else "relu",
        "n_layers": eager.n_layers,
        "d_transcoder": eager.d_transcoder,
        "d_model": d_model,
        "hooks": [cached.feature_input_hook, cached.feature_output_hook],
        "model_name": cached_config.get("model_name"),
        "model_kind": cached_config["model_kind"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
