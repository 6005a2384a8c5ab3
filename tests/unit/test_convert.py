"""BatchTopK → JumpReLU: threshold estimators, exact layer-wise L0 calibration, and conversion of a trained model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_train import config, synthetic

from clt_core.cli import main
from clt_core.convert import ConvertConfig, ThresholdStats, convert, l0_per_layer, layer_scales
from clt_core.convert.theta import threshold_statistics
from clt_core.data.sampler import SamplerConfig
from clt_core.errors import CLTError
from clt_core.model.config import CLTConfig
from clt_core.model.directory import load, read_normalizer, read_source
from clt_core.train.trainer import TrainResult, train

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A batchtopk CLT (k=4 per layer) that has recovered a planted dictionary."""
    root = tmp_path_factory.mktemp("convert")
    data = synthetic(str(root / "planted"), rows=16384, num_layers=4, d_model=64, num_features=128)
    cfg = config(
        data,
        root / "run",
        model=CLTConfig(num_features=256, activation_fn="batchtopk", k=4),
        sampler=SamplerConfig(batch_size=512, holdout_fraction=0.1, buffer_chunks=4),
        training_steps=300,
        learning_rate=3e-3,
        log_interval=100,
        eval_interval=300,
        checkpoint_interval=300,
    )
    return train(cfg, progress=False)


def test_min_mean_and_standardized_estimators_by_hand() -> None:
    stats = ThresholdStats(num_layers=1, num_features=3)
    pre = torch.tensor([[[1.0, 5.0, 0.1]], [[3.0, 2.0, 0.2]]])  # [B=2, L=1, F=3]
    stats.update(pre, torch.tensor([[[True, True, False]], [[True, False, False]]]))
    stats.update(pre * 2, torch.tensor([[[False, True, False]], [[True, True, False]]]))
    theta = stats.thresholds("min_mean", default_theta=7.0)
    assert theta[0].tolist() == pytest.approx([(1 + 6) / 2, (5 + 4) / 2, 7.0])  # feature 2 never selected
    standardized = stats.thresholds("standardized", default_theta=7.0)
    # batch 1: feature 0 min 1 (mean 2, std 1) -> z=-1; feature 1 min 5 (mean 3.5, std 1.5) -> z=1
    # batch 2: feature 0 min 6 (mean 4, std 2) -> z=1;  feature 1 min 4 (mean 7, std 3) -> z=-1: z* = 0
    assert standardized[0].tolist() == pytest.approx([(2 + 4) / 2, (3.5 + 7) / 2, 7.0])


def test_calibration_hits_the_target_l0_of_every_layer_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(1000, 3, 50, generator=gen)
    theta = torch.rand(3, 50, generator=gen) + 0.1
    target = torch.tensor([2.5, 0.0, 11.3], dtype=torch.float64)
    scales = layer_scales(pre, theta, target)
    got = l0_per_layer(pre, theta * scales[:, None].float())
    assert got.tolist() == pytest.approx([2.5, 0.0, 11.3], abs=0.5 / 1000)
    assert torch.equal(scales, layer_scales(pre, theta, target))  # deterministic


def test_conversion_keeps_nmse_and_matches_l0(trained: TrainResult, tmp_path: Path) -> None:
    report = convert(trained.final, tmp_path / "jumprelu", ConvertConfig(batches=4), progress=False)
    before, after = report["before"], report["calibrated"]
    print(f"conversion: NMSE {before['mean_nmse']:.4f} -> {report['estimated']['mean_nmse']:.4f} (estimated) -> "
          f"{after['mean_nmse']:.4f} (calibrated); L0 {before['total_l0']:.2f} -> {after['total_l0']:.2f}")  # fmt: skip
    assert before["mean_nmse"] < 0.2  # the model learned something worth converting
    assert after["mean_nmse"] < before["mean_nmse"] + 0.02
    assert report["max_l0_miss"] <= 0.5  # on the fitting rows, per layer
    for got, want in zip(after["l0"], before["l0"], strict=True):  # on held-out rows neither step saw
        assert got == pytest.approx(want, abs=0.6)
    assert set(report["estimators"]) == {"min_mean", "standardized"}
    assert report["estimator"] == min(
        report["estimators"], key=lambda n: report["estimators"][n]["calibrated"]["mean_nmse"]
    )

    out = tmp_path / "jumprelu"
    model = load(out).model
    assert model.config.activation_fn == "jumprelu"
    original = load(trained.final).model
    assert torch.equal(model.W_enc, original.W_enc) and torch.equal(model.W_dec[2], original.W_dec[2])
    assert read_source(out)["converted_from"] == str(trained.final)
    assert torch.equal(read_normalizer(out).inputs_std, read_normalizer(trained.final).inputs_std)
    assert json.loads((out / "conversion.json").read_text())["estimator"] == report["estimator"]


def test_conversion_is_deterministic(trained: TrainResult, tmp_path: Path) -> None:
    settings = ConvertConfig(batches=2, estimator="standardized")
    for name in ("a", "b"):
        convert(trained.final, tmp_path / name, settings, progress=False)
    a, b = ((tmp_path / name / "model.safetensors").read_bytes() for name in ("a", "b"))
    assert a == b


def test_bad_conversions_are_refused(trained: TrainResult, tmp_path: Path) -> None:
    convert(trained.final, tmp_path / "jr", ConvertConfig(batches=1, calibrate=False), progress=False)
    with pytest.raises(CLTError, match="only batchtopk/topk models convert"):
        convert(tmp_path / "jr", tmp_path / "again", progress=False)
    with pytest.raises(CLTError, match="exists; pass --overwrite"):
        convert(trained.final, tmp_path / "jr", progress=False)
    with pytest.raises(CLTError, match="not a checkpoint"):
        convert(tmp_path / "nothing", tmp_path / "out", progress=False)
    with pytest.raises(CLTError, match="fitting rows"):
        convert(trained.final, tmp_path / "big", ConvertConfig(fit_rows=10**6), progress=False)
    assert not (tmp_path / "big").exists() and not (tmp_path / "again").exists()


def test_threshold_statistics_count_silent_features() -> None:
    rows = threshold_statistics(torch.tensor([[0.1, 0.3, 1e6], [0.2, 0.2, 0.2]]))
    assert rows[0]["silent"] == 1 and rows[0]["median"] == pytest.approx(0.2) and rows[1]["silent"] == 0


def test_convert_and_analyze_theta_commands(
    trained: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cli"
    assert main(["convert", str(trained.final), "--out", str(out), "--batches", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated" in printed and "NMSE" in printed
    assert main(["analyze-theta", str(out), "--out", str(tmp_path / "theta")]) == 0
    printed = capsys.readouterr().out
    assert "median" in printed and (tmp_path / "theta" / "thresholds.png").stat().st_size > 1000
    assert main(["convert", str(trained.final), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["analyze-theta", str(trained.final)]) == 2  # a batchtopk model has no thresholds
