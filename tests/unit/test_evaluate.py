"""Evaluation: spliced-in CE/KL through nnsight on tiny models (oracle, zero, a real CLT against forward hooks),
held-out reconstruction metrics, plots, and the `clt evaluate` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clt_core.cli import main
from clt_core.data.sampler import Normalizer, SamplerConfig
from clt_core.evaluate.spliced import CLTReplacement, SplicedRunner, spliced_metrics
from clt_core.extract.extractor import ExtractConfig, batched_windows, extract
from clt_core.extract.models import capture_points, resolve_model
from clt_core.extract.text import TextConfig, iter_windows, limit_rows
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.train.config import TrainConfig
from clt_core.train.trainer import train

T = 32


def windows(lm, tokens: int = 160) -> list:
    text = TextConfig(source="packaged:kjv", max_documents=20)
    return list(batched_windows(limit_rows(iter_windows(text, lm.tokenizer, T), tokens), 3))


def oracle(keep: torch.Tensor):
    return lambda layer, x, y: y


def zero(keep: torch.Tensor):
    return lambda layer, x, y: torch.zeros_like(y)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_an_oracle_recovers_everything_and_zeros_equal_zero_ablation(tiny_dirs: dict[str, Path], kind: str) -> None:
    lm = resolve_model(str(tiny_dirs[kind]))
    points = capture_points(lm.model)
    batches = windows(lm)
    exact = spliced_metrics(lm.model, points, batches, oracle, progress=False)
    assert exact["ce_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert exact["kl_per_token"] == pytest.approx(0.0, abs=1e-9) and exact["top1_agreement"] == 1.0
    assert abs(exact["ce_zero_ablation"] - exact["ce_original"]) > 1e-3  # ablating the MLPs changes the tiny model
    zeros = spliced_metrics(lm.model, points, batches, zero, progress=False)
    assert zeros["ce_spliced"] == pytest.approx(zeros["ce_zero_ablation"], rel=1e-12)
    assert zeros["ce_recovered"] == pytest.approx(0.0, abs=1e-9)


def random_clt(d: int, layers: int, activation: str = "jumprelu") -> tuple[CrossLayerTranscoder, Normalizer]:
    torch.manual_seed(1)
    model = CrossLayerTranscoder(
        CLTConfig(num_layers=layers, d_model=d, num_features=48, activation_fn=activation, k=4)
    )
    with torch.no_grad():
        for w in model.W_dec:
            w.mul_(20)
        if model.log_threshold is not None:
            model.log_threshold.fill_(np.log(0.05))
    norm = Normalizer(torch.randn(layers, d) * 0.1, torch.rand(layers, d) + 0.5, torch.zeros(layers, d),
                      torch.rand(layers, d) * 0.2 + 0.05)  # fmt: skip
    return model, norm


def hook_reference(lm, points, model: CrossLayerTranscoder, norm: Normalizer, ids, keep) -> torch.Tensor:
    """The replacement model with plain forward hooks: recon_t = Σ_{s≤t} f_s·W_dec[s][:, t−s] + b_dec[t], f_s the
    JumpReLU features of the spliced run's own (normalised) MLP input at s; kept positions only."""
    features: dict[int, torch.Tensor] = {}
    handles = []
    modules = dict(lm.model.named_modules())

    def grab(layer):
        def pre_hook(_m, args, kwargs):
            x = (args[0] if args else next(iter(kwargs.values()))).float()
            pre = torch.einsum("btd,fd->btf", (x - norm.inputs_mean[layer]) / norm.inputs_std[layer],
                               model.W_enc[layer]) + model.b_enc[layer]  # fmt: skip
            features[layer] = pre * (pre > model.threshold[layer])

        return pre_hook

    def replace(layer):
        def hook(_m, _args, output):
            recon = sum(features[s] @ model.W_dec[s][:, layer - s] for s in range(layer + 1)) + model.b_dec[layer]
            recon = recon * norm.targets_std[layer] + norm.targets_mean[layer]
            return torch.where(keep[..., None], recon.to(output.dtype), output)

        return hook

    for layer in range(points.num_layers):
        handles.append(modules[points.input_name(layer)].register_forward_pre_hook(grab(layer), with_kwargs=True))
        handles.append(modules[points.output_name(layer)].register_forward_hook(replace(layer)))
    try:
        with torch.no_grad():
            return lm.model(ids).logits.float()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_nnsight_splice_equals_forward_hooks(tiny_dirs: dict[str, Path], kind: str) -> None:
    lm = resolve_model(str(tiny_dirs[kind]))
    points = capture_points(lm.model)
    model, norm = random_clt(lm.d_model, points.num_layers)
    batch = windows(lm)[0]
    ids = torch.as_tensor(np.stack([w.token_ids for w in batch]))
    keep = torch.as_tensor(np.stack([w.keep for w in batch]))
    assert not keep[:, 0].any()  # the BOS position keeps its true output
    with torch.no_grad():
        ours, _ = SplicedRunner(lm.model, points).logits(ids, keep, CLTReplacement(model, norm).reset(keep))
        original = lm.model(ids).logits.float()
    reference = hook_reference(lm, points, model, norm, ids, keep)
    assert (reference - original).abs().max() > 1e-2  # the splice changes the model's output
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained_dir(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    cfg = ExtractConfig(model=str(tiny_dirs["llama"]), text=TextConfig(source="packaged:kjv", max_documents=100),
                        tokens=2048, context_size=T, batch_size=8, compute_dtype="float32", storage_dtype="float32",
                        chunk_rows=128)  # fmt: skip
    extract(str(root / "store"), cfg, progress=False)
    result = train(TrainConfig(data=str(root / "store"), output_dir=str(root / "run"),
                               model=CLTConfig(num_features=64, activation_fn="jumprelu"),
                               sampler=SamplerConfig(batch_size=256, holdout_fraction=0.25), training_steps=20,
                               log_interval=5, eval_interval=10, checkpoint_interval=20, eval_rows=256),
                   progress=False)  # fmt: skip
    return result.final


def test_clt_evaluate_end_to_end(trained_dir: Path, tiny_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", str(trained_dir), "--out", str(out), "--spliced", "--tokens", "200", "--per-layer",
            "--text", "packaged:kjv", "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "CE recovered" in printed and "NMSE" in printed
    report = json.loads((out / "evaluation.json").read_text())
    rec, spliced = report["reconstruction"], report["spliced"]
    assert rec["rows"] == 512 and len(rec["nmse"]) == 3 and 0 <= rec["dead_fraction"] <= 1
    assert len(spliced["per_layer"]) == 3 and spliced["predictions"] > 150
    assert spliced["ce_zero_ablation"] != spliced["ce_original"]
    for name in ("layers.png", "feature_density.png", "thresholds.png", "training_curves.png"):
        assert (out / name).stat().st_size > 2000, name


def test_dead_and_dense_features_are_counted(trained_dir: Path, tmp_path: Path) -> None:
    from clt_core.evaluate.evaluation import EvaluateConfig, reconstruction_report
    from clt_core.train.checkpoint import load_model, read_normalizer, read_source, save_checkpoint

    model = load_model(trained_dir)
    with torch.no_grad():
        model.b_enc[:, :8] = -1e6  # never fire
        model.b_enc[:, 8:12] = 1e6  # always fire
    save_checkpoint(tmp_path / "m", model, None, None, read_normalizer(trained_dir), read_source(trained_dir))
    rec = reconstruction_report(tmp_path / "m", EvaluateConfig())["reconstruction"]
    assert all(dead >= 8 / 64 for dead in rec["dead_per_layer"])
    assert all(dense >= 4 / 64 for dense in rec["dense_per_layer"])


def test_a_store_of_another_model_is_refused(trained_dir: Path, tmp_path: Path, capsys) -> None:
    from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store

    make_synthetic_store(str(tmp_path / "other"), SyntheticConfig(rows=512, num_layers=3, d_model=16, num_features=8))
    assert main(["evaluate", str(trained_dir), "--data", str(tmp_path / "other"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "3 layers of width 16" in err and len(err.strip().splitlines()) == 1
