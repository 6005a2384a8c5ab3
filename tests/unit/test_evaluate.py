"""Evaluation: spliced-in CE/KL through nnsight on tiny models (oracle, zero, a real CLT against forward hooks),
held-out reconstruction metrics, plots, and the `clt evaluate` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clt_core.cli import main
from clt_core.data.sampler import Normalizer, SamplerConfig, held_out_range
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.errors import ConfigError
from clt_core.evaluate import evaluate_model
from clt_core.evaluate.plots import (
    plot_feature_density,
    plot_layer_metrics,
    plot_thresholds,
    plot_training_curves,
    training_curves_figure,
)
from clt_core.evaluate.spliced import CLTReplacement, SplicedRunner, spliced_metrics
from clt_core.extract.extractor import ExtractConfig, extract
from clt_core.lm.capture import capture_points
from clt_core.lm.corpora import TextConfig
from clt_core.lm.loading import resolve_model
from clt_core.lm.windows import batched_windows, iter_windows, limit_rows
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import save
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


def random_clt(
    d: int, layers: int, activation: str = "jumprelu", decoders: str = "cross_layer"
) -> tuple[CrossLayerTranscoder, Normalizer]:
    torch.manual_seed(1)
    model = CrossLayerTranscoder(
        CLTConfig(num_layers=layers, d_model=d, num_features=48, activation_fn=activation, k=4, decoders=decoders)
    )
    with torch.no_grad():
        for w in model.W_dec:
            w.mul_(20)
        if model.log_threshold is not None:
            model.log_threshold.fill_(np.log(0.05))
    norm = Normalizer(torch.randn(layers, d) * 0.1, torch.rand(layers, d) + 0.5, torch.zeros(layers, d),
                      torch.rand(layers, d) * 0.2 + 0.05)  # fmt: skip
    return model, norm


def reference_features(model: CrossLayerTranscoder, norm: Normalizer, layer: int, x: torch.Tensor,
                       keep: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Features `[B, T, F]` of raw MLP inputs, written out independently: JumpReLU per entry, batchtopk as the
    k·N largest pre-activations over the N kept positions; 0 at positions that are not kept."""
    pre = torch.einsum("btd,fd->btf", (x.float() - norm.inputs_mean[layer]) / norm.inputs_std[layer],
                       model.W_enc[layer]) + model.b_enc[layer]  # fmt: skip
    if model.config.activation_fn == "jumprelu":
        acts = pre * (pre > model.threshold[layer])
    else:
        kept = pre[keep]
        count = int(model.config.k * kept.shape[0])
        cut = kept.flatten().topk(count).values.min()
        acts = pre * ((pre >= cut) & (pre > 0))
    return acts * keep[..., None]


def hook_reference(lm, points, model: CrossLayerTranscoder, norm: Normalizer, ids, keep,
                   only: int | None = None) -> torch.Tensor:  # fmt: skip
    """The replacement model with plain forward hooks: recon_t = Σ_{s≤t} f_s·W_dec[s][:, t−s] + b_dec[t] at kept
    positions (per-layer decoders: f_t·W_dec[t][:, 0] + b_dec[t]). All layers (`only=None`): f_s from the spliced
    run's own MLP input at s. One layer (`only=t`): f_s from an unmodified run's inputs, and only layer t replaced."""
    per_layer = model.config.decoders == "per_layer"
    modules = dict(lm.model.named_modules())
    inputs: dict[int, torch.Tensor] = {}

    def grab(layer):
        def pre_hook(_m, args, kwargs):
            inputs[layer] = args[0] if args else next(iter(kwargs.values()))

        return pre_hook

    def replace(layer):
        def hook(_m, _args, output):
            if only is not None and layer != only:
                return output
            sources = [layer] if per_layer else range(layer + 1)
            feats = {s: reference_features(model, norm, s, inputs[s], keep) for s in sources}
            recon = sum(f @ model.W_dec[s][:, layer - s] for s, f in feats.items()) + model.b_dec[layer]
            recon = recon * norm.targets_std[layer] + norm.targets_mean[layer]
            return torch.where(keep[..., None], recon.to(output.dtype), output)

        return hook

    handles = [modules[points.input_name(layer)].register_forward_pre_hook(grab(layer), with_kwargs=True)
               for layer in range(points.num_layers)]  # fmt: skip
    try:
        with torch.no_grad():
            if only is not None:
                lm.model(ids)  # the original run's inputs, kept in `inputs`
                for h in handles:
                    h.remove()
            handles += [modules[points.output_name(layer)].register_forward_hook(replace(layer))
                        for layer in range(points.num_layers)]  # fmt: skip
            return lm.model(ids).logits.float()
    finally:
        for h in handles:
            h.remove()


def ce_and_kl(original: torch.Tensor, spliced: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """Mean next-token CE of `spliced` and mean KL(original ‖ spliced), over every prediction."""
    p = original[:, :-1].double().log_softmax(-1)
    q = spliced[:, :-1].double().log_softmax(-1)
    ce = -q.gather(-1, ids[:, 1:, None]).mean()
    return float(ce), float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_nnsight_splice_equals_forward_hooks(tiny_dirs: dict[str, Path], kind: str, activation: str) -> None:
    lm = resolve_model(str(tiny_dirs[kind]))
    points = capture_points(lm.model)
    model, norm = random_clt(lm.d_model, points.num_layers, activation)
    batch = windows(lm)[0]
    ids = torch.as_tensor(np.stack([w.token_ids for w in batch]))
    keep = torch.as_tensor(np.stack([w.keep for w in batch]))
    assert not keep[:, 0].any() and keep[:, 1:].all()  # the BOS position keeps its true output
    with torch.no_grad():
        ours, _ = SplicedRunner(lm.model, points).logits(ids, keep, CLTReplacement(model, norm).reset(keep))
        original = lm.model(ids).logits.float()
    reference = hook_reference(lm, points, model, norm, ids, keep)
    assert (reference - original).abs().max() > 1e-2  # the splice changes the model's output
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[:, 0], original[:, 0])  # BOS: every layer's true output, so the same logits


@pytest.mark.parametrize(("kind", "decoders"), [("llama", "cross_layer"), ("gpt2", "cross_layer"),
                                               ("llama", "per_layer")])  # fmt: skip
def test_per_layer_and_all_layer_metrics_match_forward_hooks(
    tiny_dirs: dict[str, Path], kind: str, decoders: str
) -> None:
    """Also for the per-layer-transcoder baseline: its spliced-in metrics replace each layer by that layer's own
    features alone."""
    lm = resolve_model(str(tiny_dirs[kind]))
    points = capture_points(lm.model)
    model, norm = random_clt(lm.d_model, points.num_layers, decoders=decoders)
    batch = windows(lm)[0]
    ids = torch.as_tensor(np.stack([w.token_ids for w in batch]))
    keep = torch.as_tensor(np.stack([w.keep for w in batch]))
    clt = CLTReplacement(model, norm)
    result = spliced_metrics(lm.model, points, [batch], clt.reset, per_layer=CLTReplacement(model, norm),
                             progress=False)  # fmt: skip
    with torch.no_grad():
        original = lm.model(ids).logits.float()
    ce, kl = ce_and_kl(original, hook_reference(lm, points, model, norm, ids, keep), ids)
    assert result["ce_spliced"] == pytest.approx(ce, abs=1e-4) and result["kl_per_token"] == pytest.approx(kl, abs=1e-4)
    assert len(result["per_layer"]) == points.num_layers
    for layer, metrics in enumerate(result["per_layer"]):
        ce, kl = ce_and_kl(original, hook_reference(lm, points, model, norm, ids, keep, only=layer), ids)
        assert kl > 1e-4  # replacing one layer changes the output...
        assert metrics["ce_spliced"] == pytest.approx(ce, abs=1e-4)  # ...exactly as the hooks do
        assert metrics["kl_per_token"] == pytest.approx(kl, abs=1e-4)
        assert metrics["ce_original"] == pytest.approx(result["ce_original"], rel=1e-12)


def test_a_global_topk_model_cannot_be_spliced_layer_by_layer() -> None:
    model = CrossLayerTranscoder(CLTConfig(num_layers=2, d_model=8, num_features=16, activation_fn="batchtopk", k=2,
                                           topk_scope="global"))  # fmt: skip
    with pytest.raises(ConfigError, match="global k"):
        CLTReplacement(model, None)


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
    assert "CE recovered" in printed and "NMSE" in printed and "CE recovered per layer" in printed
    report = json.loads((out / "evaluation.json").read_text())
    rec, spliced = report["reconstruction"], report["spliced"]
    assert rec["rows"] == 512 and len(rec["nmse"]) == 3 and 0 <= rec["dead_fraction"] <= 1
    assert len(spliced["per_layer"]) == 3 and spliced["predictions"] > 150
    assert spliced["ce_zero_ablation"] != spliced["ce_original"]
    for name in ("layers.png", "feature_density.png", "thresholds.png", "training_curves.png"):
        assert (out / name).stat().st_size > 2000, name


def test_dead_and_dense_features_are_counted_exactly(tmp_path: Path) -> None:
    """A hand-built relu CLT on a synthetic store: per layer 4 features never fire, 3 always fire, one fires on the
    top 5 % of held-out rows (neither dead nor dense at 10 %, dense at 1 %) and 8 stay at relu(0) = 0 (dead)."""
    L, d, F = 3, 16, 16
    store = make_synthetic_store(str(tmp_path / "store"), SyntheticConfig(rows=1024, num_layers=L, d_model=d,
                                 num_features=8, rows_per_chunk=128, dtype="float32"))  # fmt: skip
    start, stop = held_out_range(store, 0.25)
    x = store.read(start, stop).inputs.float()
    model = CrossLayerTranscoder(CLTConfig(num_layers=L, d_model=d, num_features=F, activation_fn="relu"))
    with torch.no_grad():
        model.W_enc.zero_()
        model.b_enc.zero_()
        model.b_enc[:, :4] = -1.0
        model.b_enc[:, 4:7] = 1.0
        for layer in range(L):
            model.W_enc[layer, 7, 0] = 1.0
            model.b_enc[layer, 7] = -torch.quantile(x[:, layer, 0], 0.95)
    save(tmp_path / "run" / "final", model)
    (tmp_path / "run" / "train_config.yaml").write_text("sampler:\n  holdout_fraction: 0.25\n")
    rec = evaluate_model(tmp_path / "run" / "final", store.url)
    assert rec["holdout_fraction"] == 0.25 and rec["held_out_rows"] == [start, stop] and rec["rows"] == stop - start
    assert rec["dead_per_layer"] == [12 / F] * L and rec["dead_count"] == 12 * L
    assert rec["dense_per_layer"] == [3 / F] * L and rec["dense_count"] == 3 * L
    assert rec["l0"] == pytest.approx([3.05] * L, abs=0.01)
    density = rec["feature_density"]
    assert density.shape == (L, F) and 0.04 < float(density[:, 7].min()) <= float(density[:, 7].max()) < 0.06
    strict = evaluate_model(tmp_path / "run" / "final", store.url, dense_threshold=0.01, max_rows=128)
    assert strict["dense_count"] == 4 * L and strict["rows"] == 128
    assert evaluate_model(tmp_path / "run" / "final", store.url, holdout_fraction=0.5)["rows"] == 512


def test_plots_write_pngs_and_refuse_models_without_thresholds(tmp_path: Path) -> None:
    model = CrossLayerTranscoder(CLTConfig(num_layers=2, d_model=8, num_features=32, activation_fn="jumprelu"))
    with torch.no_grad():
        model.log_threshold.uniform_(-5, 0)
    metrics = {"nmse": [0.2, 0.3], "l0": [5.0, 7.0], "mean_nmse": 0.25, "total_l0": 12.0}
    lines = [{"step": s, "loss/total": 1 / (s + 1), "eval/mean_nmse": 0.5 / (s + 1)} for s in range(0, 50, 10)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    for path in (plot_layer_metrics(metrics, tmp_path / "layers.png"),
                 plot_feature_density(torch.rand(2, 32) * (torch.rand(2, 32) > 0.2), tmp_path / "density.png"),
                 plot_thresholds(model, tmp_path / "thresholds.png"),
                 plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")):  # fmt: skip
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    relu = CrossLayerTranscoder(CLTConfig(num_layers=2, d_model=8, num_features=32, activation_fn="relu"))
    with pytest.raises(ConfigError, match="no thresholds"):
        plot_thresholds(relu, tmp_path / "none.png")


def test_training_curves_put_one_quantity_per_axis(tmp_path: Path) -> None:
    """Loss terms, held-out NMSE and L0 each on an axis of their own (log, log, linear), stacked on one shared step
    axis, each labelled with its unit: never L0 and NMSE on one log axis."""
    import matplotlib.pyplot as plt

    losses = {"loss/total": 2.0, "loss/reconstruction": 1.5, "loss/sparsity": 0.5, "loss/auxk": 0.0}
    lines = [{"step": s, **{k: v / s for k, v in losses.items()}, "l0/total": 12.0, "dead_fraction": 0.1, "lr": 1e-3}
             for s in range(1, 51)]  # fmt: skip
    nmse = {f"eval/nmse/layer_{i}": 0.4 + 0.1 * i for i in range(3)}
    lines += [{"step": s, "eval/mean_nmse": 0.5 / s, "eval/total_l0": 11.5, "eval/dead_fraction": 0.0,
               **{k: v / s for k, v in nmse.items()}} for s in (10, 20, 30, 40, 50)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    fig = training_curves_figure(tmp_path / "metrics.jsonl")
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["loss (normalised units)", "NMSE (MSE / variance)",
                                                "active features per token"]  # fmt: skip
    assert [ax.get_yscale() for ax in axes] == ["log", "log", "linear"]
    assert [ax.get_xlabel() for ax in axes] == ["", "", "training step"]
    assert all(axes[0].get_shared_x_axes().joined(axes[0], ax) for ax in axes[1:])
    labels = [sorted(line.get_label() for line in ax.get_lines()) for ax in axes]
    assert labels == [
        ["reconstruction", "sparsity", "total"],  # auxk (all 0) has no place on a log axis
        ["layer 0", "layer 1", "layer 2", "mean over layers"],
        ["held-out", "training batches"],
    ]
    plt.close(fig)
    # a run that logged losses only: one panel
    (tmp_path / "losses.jsonl").write_text("\n".join(json.dumps({"step": s, "loss/total": 1 / s}) for s in (1, 2, 3)))
    fig = training_curves_figure(tmp_path / "losses.jsonl")
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss (normalised units)"]
    plt.close(fig)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 1, "lr": 1e-3}))
    with pytest.raises(ConfigError, match="no loss or evaluation metrics"):
        training_curves_figure(tmp_path / "empty.jsonl")


def test_a_store_of_another_model_is_refused(trained_dir: Path, tmp_path: Path, capsys) -> None:
    make_synthetic_store(str(tmp_path / "other"), SyntheticConfig(rows=512, num_layers=3, d_model=16, num_features=8))
    assert main(["evaluate", str(trained_dir), "--data", str(tmp_path / "other"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "3 layers of width 16" in err and len(err.strip().splitlines()) == 1
