"""Run by circuit-tracer's own venv (`make circuit-tracer-venv`): load an export with `load_clt` and write its
reconstruction of raw inputs. Usage: python circuit_tracer_check.py EXPORT_DIR INPUTS.safetensors OUT.safetensors"""

import sys

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from safetensors.torch import load_file, save_file

export, inputs, out = sys.argv[1:4]
clt = load_clt(export, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out",
               device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)  # fmt: skip
x = load_file(inputs)["x"]  # [N, L, d], raw MLP inputs
with torch.no_grad():
    recon = clt(x.transpose(0, 1).contiguous())  # circuit-tracer is layer-first: [L, N, d]
save_file({"reconstruction": recon.transpose(0, 1).contiguous()}, out)
print(
    f"circuit-tracer {type(clt.activation_function).__name__} CLT: {clt.n_layers} layers, {clt.d_transcoder} features"
)
