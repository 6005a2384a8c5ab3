"""circuit-tracer export: folding is exact, the files reproduce our raw reconstruction under circuit-tracer's own math,
the round trip is lossless, and what circuit-tracer cannot run is refused with the fix. A per-layer model exports as
circuit-tracer's transcoder set (one `layer_{i}.safetensors` per layer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from model_dirs import D, F, L, make_model_dir, raw_reconstruction
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from clt_core.cli import main
from clt_core.data.sampler import Normalizer
from clt_core.errors import CLTError, ConfigError
from clt_core.export import circuit_tracer as ct
from clt_core.export import circuit_tracer_hooks, export_circuit_tracer, fold_normalization, load_circuit_tracer
from clt_core.lm.capture import PRESETS, CapturePoints
from clt_core.model.directory import save


def preset_templates(architecture: str) -> dict[str, str]:
    """The `hook_templates` a store extracted with the architecture's capture preset records."""
    in_t, in_k, out_t, out_k = PRESETS[architecture]
    return CapturePoints(input_template=in_t, output_template=out_t, input_kind=in_k, output_kind=out_k).as_dict()


LLAMA_SOURCE = {
    "data": "/stores/smollm2",
    "store": {
        "model": {"name": "HuggingFaceTB/SmolLM2-135M", "architecture": "llama"},
        "hook_templates": preset_templates("llama"),
    },
}


def llama_model_dir(
    path: Path, activation: str = "jumprelu", normalise: bool = True, decoders: str = "cross_layer"
) -> tuple[Path, Normalizer]:
    """A tiny random CLT (3 layers, d=16, 32 features) with a random normalisation, trained "on" a Llama store."""
    model_dir, norm = make_model_dir(path, activation, normalise, decoders)
    (model_dir / "source.json").write_text(json.dumps(LLAMA_SOURCE))
    return model_dir, norm


def raw_inputs(norm: Normalizer, n: int = 64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return norm.inputs_mean + norm.inputs_std * torch.randn(n, L, D, generator=gen) * 1.5


def circuit_tracer_forward(export: Path, x: torch.Tensor) -> tuple[np.ndarray, dict[str, float]]:
    """circuit-tracer 0.5's CLT math over the exported files, in numpy (written from its source, not from our model):
    `_load_state_dict` reads W_enc_{i}/b_enc_{i}/b_dec_{i}/threshold_{i} and W_dec_{i}; JumpReLU when threshold_0
    exists (features = pre·(pre > θ)), else ReLU; recon_t = Σ_{s≤t} features_s·W_dec_s[:, t−s] + b_dec_t."""
    n_layers = len(list(export.glob("W_enc_*.safetensors")))  # how load_clt counts layers
    enc = [load_numpy(str(export / f"W_enc_{i}.safetensors")) for i in range(n_layers)]
    dec = [load_numpy(str(export / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(n_layers)]
    xs = x.double().numpy()
    out = np.stack([np.broadcast_to(enc[t][f"b_dec_{t}"], (len(xs), D)) for t in range(n_layers)], axis=1).astype(float)
    jump_relu = "threshold_0" in enc[0]
    active = below = positive = 0
    for s in range(n_layers):
        pre = xs[:, s] @ enc[s][f"W_enc_{s}"].T.astype(float) + enc[s][f"b_enc_{s}"]
        feats = pre * (pre > enc[s][f"threshold_{s}"]) if jump_relu else np.maximum(pre, 0)
        active, positive = active + (feats != 0).sum(), positive + (pre > 0).sum()
        below += ((pre > 0) & (feats == 0)).sum()
        for j in range(n_layers - s):
            out[:, s + j] += feats @ dec[s][:, j].astype(float)
    return out, {"active": active / (len(xs) * n_layers * F), "below_threshold": below / max(positive, 1)}


def close(a: torch.Tensor | np.ndarray, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = b.detach().double()
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item()))


def test_folding_is_exact() -> None:
    """Each folded parameter is the float64 formula rounded once to float32; computed here by explicit loops."""
    gen = torch.Generator().manual_seed(3)
    state = {
        "W_enc": torch.randn(L, F, D, generator=gen),
        "b_enc": torch.randn(L, F, generator=gen),
        "b_dec": torch.randn(L, D, generator=gen),
        "log_threshold": torch.randn(L, F, generator=gen),
        **{f"W_dec.{s}": torch.randn(F, L - s, D, generator=gen) for s in range(L)},
    }
    norm = Normalizer(
        torch.randn(L, D, generator=gen) * 5,
        torch.rand(L, D, generator=gen) * 3 + 0.01,
        torch.randn(L, D, generator=gen) * 2,
        torch.rand(L, D, generator=gen) * 3 + 0.01,
    )
    folded = fold_normalization(state, norm)
    assert set(folded) == set(state) and all(v.dtype == torch.float32 for v in folded.values())
    f64 = {k: v.double() for k, v in state.items()}
    mi, si, mt, st = (t.double() for t in (norm.inputs_mean, norm.inputs_std, norm.targets_mean, norm.targets_std))

    def exact(got: torch.Tensor, want: torch.Tensor) -> bool:  # within float32's rounding of the float64 value
        return bool(torch.allclose(got.double(), want, rtol=2**-24, atol=1e-12))

    for layer in range(L):
        assert exact(folded["W_enc"][layer], f64["W_enc"][layer] / si[layer])
        shift = torch.stack([(f64["W_enc"][layer, f] * mi[layer] / si[layer]).sum() for f in range(F)])
        assert exact(folded["b_enc"][layer], f64["b_enc"][layer] - shift)
        assert exact(folded["b_dec"][layer], f64["b_dec"][layer] * st[layer] + mt[layer])
    for s in range(L):
        for j in range(L - s):
            assert exact(folded[f"W_dec.{s}"][:, j], f64[f"W_dec.{s}"][:, j] * st[s + j])
    assert torch.equal(folded["log_threshold"], state["log_threshold"])  # pre-activations do not change
    unchanged = fold_normalization(state, None)
    assert all(torch.equal(unchanged[k], state[k]) for k in state)


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_the_export_reproduces_our_raw_reconstruction(tmp_path: Path, activation: str) -> None:
    model_dir, norm = llama_model_dir(tmp_path / "model", activation)
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    x = raw_inputs(norm)
    ours = raw_reconstruction(model_dir, norm, x)  # normalizer.raw_targets(model(normalizer.inputs(x)))
    theirs, stats = circuit_tracer_forward(export, x)
    assert close(theirs, ours)
    assert 0.1 < stats["active"] < 0.9  # the features are neither all on nor all off...
    if activation == "jumprelu":
        assert stats["below_threshold"] > 0.02  # ...and the thresholds decide some of them
    # The folding matters: the unfolded weights on raw inputs, or the folded ones on normalised inputs, are far off.
    assert not close(circuit_tracer_forward(export, norm.inputs(x))[0], ours, rtol=1e-2)
    unfolded, _ = llama_model_dir(tmp_path / "plain", activation, normalise=False)
    assert not close(circuit_tracer_forward(export_circuit_tracer(unfolded, tmp_path / "ct-plain"), x)[0], ours, 1e-2)


def test_the_export_holds_what_load_clt_reads(tmp_path: Path) -> None:
    model_dir, _ = llama_model_dir(tmp_path / "model")
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    config = yaml.safe_load((export / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    assert config["model_name"] == "HuggingFaceTB/SmolLM2-135M"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert config["activation_function"] == "jump_relu" and config["clt_pipeline"]["normalization_folded"] is True
    assert sorted(p.name for p in export.glob("W_enc_*.safetensors")) == [f"W_enc_{i}.safetensors" for i in range(L)]
    for i in range(L):
        enc = load_file(str(export / f"W_enc_{i}.safetensors"))
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            f"W_enc_{i}": (F, D),
            f"b_enc_{i}": (F,),
            f"b_dec_{i}": (D,),
            f"threshold_{i}": (F,),
        }
        assert all(v.dtype == torch.float32 for v in enc.values())
        assert (enc[f"threshold_{i}"] > 0).all()  # raw thresholds, not their log
        dec = load_file(str(export / f"W_dec_{i}.safetensors"))
        assert {k: tuple(v.shape) for k, v in dec.items()} == {f"W_dec_{i}": (F, L - i, D)}
    assert json.loads((export / "source.json").read_text()) == LLAMA_SOURCE
    assert not (export / "normalization.safetensors").exists()  # folded in


def test_relu_models_export_without_thresholds(tmp_path: Path) -> None:
    model_dir, _ = llama_model_dir(tmp_path / "model", "relu")
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    assert not any(k.startswith("threshold") for k in load_file(str(export / "W_enc_0.safetensors")))
    assert yaml.safe_load((export / "config.yaml").read_text())["activation_function"] == "relu"


def test_hooks_follow_the_capture_presets() -> None:
    def hooks(arch: str) -> tuple[str, str]:
        return circuit_tracer_hooks(preset_templates(arch))

    for arch in ("llama", "qwen3", "mistral", "gpt2", "gpt_neox"):
        assert hooks(arch) == ("mlp.hook_in", "mlp.hook_out"), arch
    assert hooks("gemma2") == hooks("gemma3_text") == ("mlp.hook_in", "hook_mlp_out")
    assert circuit_tracer_hooks({}) == ("mlp.hook_in", "mlp.hook_out")  # no provenance: our default capture points
    resid = {
        "input_template": "model.layers.{layer}",
        "input_kind": "output",
        "output_template": "model.layers.{layer}",
    }
    with pytest.raises(ConfigError, match="--input-hook and --output-hook"):
        circuit_tracer_hooks(resid)


def test_unknown_capture_points_export_with_the_hooks_given(tmp_path: Path) -> None:
    model_dir, _ = make_model_dir(tmp_path / "model")  # its source names a module circuit-tracer has no hook for
    with pytest.raises(ConfigError, match="--input-hook"):
        export_circuit_tracer(model_dir, tmp_path / "ct")
    export = export_circuit_tracer(model_dir, tmp_path / "ct", input_hook="hook_resid_mid", output_hook="hook_mlp_out")
    config = yaml.safe_load((export / "config.yaml").read_text())
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("hook_resid_mid", "hook_mlp_out")


def test_the_round_trip_gives_a_native_model_on_raw_activations(tmp_path: Path) -> None:
    model_dir, norm = llama_model_dir(tmp_path / "model")
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    model, source = load_circuit_tracer(export)
    assert source == LLAMA_SOURCE and model.config == load_circuit_tracer(export)[0].config
    x = raw_inputs(norm, seed=2)
    expected = raw_reconstruction(model_dir, norm, x)
    with torch.no_grad():
        assert close(model(x).reconstruction, expected)
    # Lossless: saved as a native model directory (no normalisation) and exported again, the files are the same.
    save(tmp_path / "back", model, None, source)
    again = export_circuit_tracer(tmp_path / "back", tmp_path / "ct2")
    assert (again / "config.yaml").read_text() == (export / "config.yaml").read_text().replace(
        "normalization_folded: true", "normalization_folded: false"
    )
    for name in [f"W_enc_{i}.safetensors" for i in range(L)] + [f"W_dec_{i}.safetensors" for i in range(L)]:
        first, second = load_file(str(export / name)), load_file(str(again / name))
        for key in first:
            if key.startswith("threshold"):  # through log and exp: float32 rounding
                assert torch.allclose(first[key], second[key], rtol=1e-6, atol=0), key
            else:
                assert torch.equal(first[key], second[key]), key


def test_a_damaged_export_is_refused(tmp_path: Path) -> None:
    model_dir, _ = llama_model_dir(tmp_path / "model")
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    (export / "W_dec_1.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"W_dec_1\.safetensors is missing"):
        load_circuit_tracer(export)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_circuit_tracer(tmp_path / "model" / "nothing")


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_topk_models_are_refused_with_the_fix(tmp_path: Path, activation: str) -> None:
    model_dir, _ = llama_model_dir(tmp_path / "model", activation)
    with pytest.raises(CLTError, match=f"{activation} model.*clt convert {model_dir} --out DIR"):
        export_circuit_tracer(model_dir, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_a_failed_export_leaves_the_previous_one_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, _ = llama_model_dir(tmp_path / "model")
    export = export_circuit_tracer(model_dir, tmp_path / "out" / "ct")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    calls = []

    def failing_save(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(*args, **kwargs)

    monkeypatch.setattr(ct, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_circuit_tracer(model_dir, export, overwrite=True)
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ct"]  # no temporary directory left behind


def test_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir, _ = llama_model_dir(tmp_path / "model")
    out = tmp_path / "out"

    def error() -> str:
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line
        return err

    assert main(["export", str(model_dir), "--format", "circuit-tracer", "--out", str(out)]) == 0
    assert "circuit-tracer files in" in capsys.readouterr().out
    assert main(["export", str(model_dir), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in error()
    assert main(["export", str(model_dir), "--out", str(out), "--overwrite", "--output-hook", "hook_mlp_out"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["feature_output_hook"] == "hook_mlp_out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # the old export replaced, nothing left
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a checkpoint" in error()
    assert main(["export", str(model_dir), "--out", str(model_dir), "--overwrite"]) == 2
    assert "is the model directory itself" in error() and (model_dir / "model.safetensors").exists()
    btk, _ = llama_model_dir(tmp_path / "btk", "batchtopk")
    assert main(["export", str(btk), "--out", str(tmp_path / "x")]) == 2
    assert "clt convert" in error() and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ per-layer: transcoder set
def transcoder_set_forward(export: Path, x: torch.Tensor) -> np.ndarray:
    """circuit-tracer 0.5's transcoder-set math over the exported files, in numpy (from its source,
    `single_layer_transcoder.py`): `load_relu_transcoder` reads `layer_{i}.safetensors` (W_enc [F, d], W_dec [F, d],
    b_enc, b_dec, and `activation_function.threshold` for JumpReLU, else ReLU); layer i's output is
    features_i·W_dec + b_dec, from layer i's input alone."""
    layers = [load_numpy(str(export / f"layer_{i}.safetensors")) for i in range(len(list(export.glob("layer_*"))))]
    out = []
    for i, t in enumerate(layers):
        pre = x[:, i].double().numpy() @ t["W_enc"].T.astype(float) + t["b_enc"]
        threshold = t.get("activation_function.threshold")
        feats = pre * (pre > threshold) if threshold is not None else np.maximum(pre, 0)
        out.append(feats @ t["W_dec"].astype(float) + t["b_dec"])
    return np.stack(out, axis=1)


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_a_per_layer_model_exports_as_a_transcoder_set(tmp_path: Path, activation: str) -> None:
    model_dir, norm = llama_model_dir(tmp_path / "model", activation, decoders="per_layer")
    export = export_circuit_tracer(model_dir, tmp_path / "ct")
    config = yaml.safe_load((export / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "HuggingFaceTB/SmolLM2-135M"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    names = sorted(p.name for p in export.glob("*.safetensors"))
    assert names == [f"layer_{i}.safetensors" for i in range(L)]  # no W_enc_*/W_dec_*: load_clt would take those
    shapes = {"W_enc": (F, D), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)}
    if activation == "jumprelu":
        shapes["activation_function.threshold"] = (F,)
    for i in range(L):
        tensors = load_file(str(export / f"layer_{i}.safetensors"))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
        assert all(v.dtype == torch.float32 for v in tensors.values())
    x = raw_inputs(norm)
    ours = raw_reconstruction(model_dir, norm, x)
    assert close(transcoder_set_forward(export, x), ours)
    # the round trip: a native per-layer model on raw activations, and the same files when exported again
    model, source = load_circuit_tracer(export)
    assert model.config.decoders == "per_layer" and source == LLAMA_SOURCE
    with torch.no_grad():
        assert close(model(x).reconstruction, ours)
    save(tmp_path / "back", model, None, source)
    again = export_circuit_tracer(tmp_path / "back", tmp_path / "ct2")
    for i in range(L):
        first, second = (load_file(str(e / f"layer_{i}.safetensors")) for e in (export, again))
        for key in first:  # exact, but the thresholds (through log and exp: float32 rounding)
            tol = {"rtol": 1e-6, "atol": 0.0} if key.endswith("threshold") else {"rtol": 0.0, "atol": 0.0}
            torch.testing.assert_close(second[key], first[key], **tol, msg=key)
    (export / "layer_1.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"layer_1\.safetensors is missing"):
        load_circuit_tracer(export)


def test_per_layer_decoders_fold_with_their_own_layers_target_scale() -> None:
    gen = torch.Generator().manual_seed(4)
    state = {"W_enc": torch.randn(L, F, D, generator=gen), "b_enc": torch.randn(L, F, generator=gen),
             "b_dec": torch.randn(L, D, generator=gen),
             **{f"W_dec.{s}": torch.randn(F, 1, D, generator=gen) for s in range(L)}}  # fmt: skip
    norm = Normalizer(torch.randn(L, D, generator=gen), torch.rand(L, D, generator=gen) + 0.1,
                      torch.randn(L, D, generator=gen), torch.rand(L, D, generator=gen) + 0.1)  # fmt: skip
    folded = fold_normalization(state, norm)
    for s in range(L):
        want = state[f"W_dec.{s}"].double() * norm.targets_std[s].double()
        assert folded[f"W_dec.{s}"].shape == (F, 1, D)
        assert torch.allclose(folded[f"W_dec.{s}"].double(), want, rtol=2**-24, atol=1e-12)
