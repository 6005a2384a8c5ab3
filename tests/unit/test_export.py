"""circuit-tracer export: the folded files reproduce our reconstruction of raw activations; the round trip is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from model_dirs import D, F, L, make_model_dir, raw_reconstruction
from safetensors.torch import load_file

from clt_core.cli import main
from clt_core.errors import CLTError
from clt_core.export import export_circuit_tracer, load_export


def circuit_tracer_forward(export: Path, x: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's CLT math over the exported files (written from its source, not from ours):
    features_l = act(x_l·W_enc_lᵀ + b_enc_l), recon_t = Σ_{s≤t} features_s·W_dec_s[:, t−s] + b_dec_t."""
    enc = [load_file(str(export / f"W_enc_{i}.safetensors")) for i in range(L)]
    dec = [load_file(str(export / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(L)]
    out = torch.stack([enc[t][f"b_dec_{t}"].expand(x.shape[0], D) for t in range(L)], dim=1).clone()
    for s in range(L):
        pre = x[:, s] @ enc[s][f"W_enc_{s}"].T + enc[s][f"b_enc_{s}"]
        theta = enc[s].get(f"threshold_{s}")
        feats = pre * (pre > theta) if theta is not None else pre.relu()
        for j in range(L - s):
            out[:, s + j] += feats @ dec[s][:, j]
    return out


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_the_export_reproduces_our_raw_reconstruction(tmp_path: Path, activation: str) -> None:
    model_dir, norm = make_model_dir(tmp_path / "model", activation)
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    x = torch.randn(64, L, D) * 3 + norm.inputs_mean
    ours = raw_reconstruction(model_dir, norm, x).detach()
    theirs = circuit_tracer_forward(export, x)
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-4 * ours.abs().max())
    assert not torch.allclose(circuit_tracer_forward(export, norm.inputs(x)), ours, atol=1e-2)  # folding matters
    config = yaml.safe_load((export / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder" and config["model_name"] == "tiny-llama"
    assert ("threshold_0" in load_file(str(export / "W_enc_0.safetensors"))) == (activation == "jumprelu")
    assert load_file(str(export / "W_dec_1.safetensors"))["W_dec_1"].shape == (F, L - 1, D)


def test_the_round_trip_gives_a_native_model_on_raw_activations(tmp_path: Path) -> None:
    model_dir, norm = make_model_dir(tmp_path / "model")
    x = torch.randn(32, L, D) * 3 + norm.inputs_mean
    back = load_export(export_circuit_tracer(model_dir, tmp_path / "ct"))
    expected = raw_reconstruction(model_dir, norm, x).detach()
    assert torch.allclose(back(x).reconstruction.detach(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_without_normalisation_the_export_holds_the_weights_unchanged(tmp_path: Path) -> None:
    model_dir, _ = make_model_dir(tmp_path / "model", normalise=False)
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    weights = load_file(str(model_dir / "model.safetensors"))
    assert torch.equal(load_file(str(export / "W_enc_2.safetensors"))["W_enc_2"], weights["W_enc"][2])
    assert torch.equal(load_file(str(export / "W_dec_0.safetensors"))["W_dec_0"], weights["W_dec.0"])


def test_batchtopk_models_and_existing_outputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir, _ = make_model_dir(tmp_path / "btk", "batchtopk")
    with pytest.raises(CLTError, match="clt convert"):
        export_circuit_tracer(model_dir, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    jr, _ = make_model_dir(tmp_path / "jr")
    assert main(["export", str(jr), "--out", str(tmp_path / "out")]) == 0
    assert main(["export", str(jr), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
