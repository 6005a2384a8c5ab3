"""circuit-tracer itself loads our export and reproduces our reconstruction of raw activations.

circuit-tracer 0.5 pins transformers 4.57 and cannot share our environment: it runs in `.venv-circuit-tracer`, which
`make circuit-tracer-venv` builds (torch 2.13.0 first, then circuit-tracer; the first run takes a minute or two), and
`circuit_tracer_check.py` does the loading there. Run with `make check-circuit-tracer`.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from model_dirs import D, F, L, make_model_dir, raw_reconstruction
from safetensors.torch import load_file, save_file

from clt_core.export import export_circuit_tracer

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv-circuit-tracer" / "bin" / "python"
CHECK = Path(__file__).with_name("circuit_tracer_check.py")
# What pip/uv print when the package registry cannot be reached (not when a package or version is missing).
UNREACHABLE = re.compile(
    r"Failed to fetch|Could not connect|Connection refused|Network is unreachable|Temporary failure in name "
    r"resolution|NewConnectionError|ConnectTimeout|dns error|error sending request",
    re.IGNORECASE,
)
LLAMA_SOURCE = {
    "data": "/stores/smollm2",
    "store": {
        "model": {"name": "HuggingFaceTB/SmolLM2-135M", "architecture": "llama"},
        "hook_templates": {
            "input_template": "model.layers.{layer}.mlp",
            "input_kind": "input",
            "output_template": "model.layers.{layer}.mlp",
            "output_kind": "output",
        },
    },
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def circuit_tracer_python() -> Path:
    built = subprocess.run(["make", "-s", "circuit-tracer-venv"], cwd=ROOT, capture_output=True, text=True)
    if built.returncode != 0:
        log = built.stdout[-3000:] + built.stderr[-3000:]
        if UNREACHABLE.search(log):
            pytest.skip(f"cannot install circuit-tracer: the package registry is unreachable:\n{log[-1500:]}")
        pytest.fail(f"`make circuit-tracer-venv` failed:\n{log}")
    return VENV_PYTHON


@pytest.mark.parametrize("decoders", ["cross_layer", "per_layer"])
@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_load_clt_reproduces_our_raw_reconstruction(
    tmp_path: Path, circuit_tracer_python: Path, activation: str, decoders: str
) -> None:
    """A cross-layer model loads as circuit-tracer's CrossLayerTranscoder (load_clt), a per-layer one as its
    TranscoderSet (load_transcoder_set); both through its cache too."""
    model_dir, norm = make_model_dir(tmp_path / "model", activation, decoders=decoders)
    (model_dir / "source.json").write_text(json.dumps(LLAMA_SOURCE))
    export = export_circuit_tracer(model_dir, tmp_path / "exports" / "smollm2-clt")
    gen = torch.Generator().manual_seed(5)
    x = norm.inputs_mean + norm.inputs_std * torch.randn(96, L, D, generator=gen) * 1.5
    inputs, outputs = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    save_file({"x": x.contiguous()}, str(inputs))
    command = [str(circuit_tracer_python), str(CHECK), str(export), str(inputs), str(outputs)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    per_layer = decoders == "per_layer"
    assert summary == {
        "kind": "TranscoderSet" if per_layer else "CrossLayerTranscoder",
        "activation": "jump_relu" if activation == "jumprelu" else "relu",
        "n_layers": L,
        "d_transcoder": F,
        "d_model": D,
        "hooks": ["mlp.hook_in", "mlp.hook_out"],
        "model_name": "HuggingFaceTB/SmolLM2-135M",
        "model_kind": "transcoder_set" if per_layer else "cross_layer_transcoder",
    }
    ours = raw_reconstruction(model_dir, norm, x).detach()  # normalizer.raw_targets(model(normalizer.inputs(x)))
    for way, theirs in load_file(str(outputs)).items():
        error = ((theirs - ours).abs().max() / ours.abs().max()).item()
        assert error < 1e-5, f"circuit-tracer ({way}) differs from our reconstruction by {error:.2e} (relative)"
