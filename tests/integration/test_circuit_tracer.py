"""circuit-tracer itself (in its own venv: it pins transformers 4.57) loads our export with `load_clt` and
reproduces our reconstruction of raw activations. Slow: the first run installs the venv (`make circuit-tracer-venv`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from model_dirs import D, L, make_model_dir, raw_reconstruction
from safetensors.torch import load_file, save_file

from clt_core.export import export_circuit_tracer

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv-circuit-tracer" / "bin" / "python"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_load_clt_reproduces_our_reconstruction(tmp_path: Path, activation: str) -> None:
    built = subprocess.run(["make", "-s", "circuit-tracer-venv"], cwd=ROOT, capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"could not install circuit-tracer's venv:\n{built.stdout[-2000:]}{built.stderr[-2000:]}")
    model_dir, norm = make_model_dir(tmp_path / "model", activation)
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    x = torch.randn(48, L, D) * 3 + norm.inputs_mean
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    run = subprocess.run(
        [str(VENV_PYTHON), str(Path(__file__).with_name("circuit_tracer_check.py")), str(export),
         str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(str(tmp_path / "y.safetensors"))["reconstruction"]
    ours = raw_reconstruction(model_dir, norm, x).detach()
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max()), (theirs - ours).abs().max()
