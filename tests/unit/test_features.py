"""`clt features`: the streamed per-feature statistics against a brute-force dense computation on the tiny Llama
(forward hooks, every activation kept), the viewer's binary format read back by a reader written to its spec,
bounded state, the logits' definition, bad input and the command line."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from clt_core.cli import main
from clt_core.data.sampler import Normalizer
from clt_core.errors import ConfigError
from clt_core.features import FeatureCollector, FeaturesConfig, cantor, collect_features, write_features
from clt_core.features.logits import logit_tokens
from clt_core.features.run import histogram
from clt_core.lm.capture import capture_points, capture_with_hooks
from clt_core.lm.corpora import TextConfig
from clt_core.lm.loading import resolve_model
from clt_core.lm.windows import PackedWindow, iter_windows, limit_rows
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import load, save

T, L, D, F = 32, 3, 64, 32
DEAD = [0, 1, 2]  # features forced never to fire, in every layer
TEXT = {"source": "packaged:kjv", "max_documents": 40}


def make_model_dir(path: Path, llama: Path, activation: str = "jumprelu") -> Path:
    torch.manual_seed(1)
    model = CrossLayerTranscoder(CLTConfig(num_layers=L, d_model=D, num_features=F, activation_fn=activation, k=4))
    with torch.no_grad():
        if model.log_threshold is not None:
            model.log_threshold.fill_(np.log(0.3))
        model.b_enc[:, DEAD] = -1e4
    norm = Normalizer(torch.randn(L, D) * 0.1, torch.rand(L, D) + 0.5, torch.zeros(L, D), torch.rand(L, D) * 0.2 + 0.05)
    hooks = {"input_template": "model.layers.{layer}.mlp", "input_kind": "input",
             "output_template": "model.layers.{layer}.mlp", "output_kind": "output"}  # fmt: skip
    store = {"model": {"name": str(llama)}, "context_size": T, "hook_templates": hooks, "extraction": {"text": TEXT}}
    save(path, model, norm, {"data": None, "store": store})
    return path


@pytest.fixture(scope="module")
def model_dirs(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("features")
    return {a: make_model_dir(root / a, tiny_dirs["llama"], a) for a in ("jumprelu", "relu", "batchtopk")}


def brute_force(model_dir: Path, llama: Path, tokens: int, batch: int) -> tuple[list[PackedWindow], torch.Tensor]:
    """Every activation `[W, T, L, F]` (0 where not kept), written out independently: forward hooks, then the CLT's
    formulas by hand (batchtopk: the k·N largest pre-activations over each batch's N kept positions)."""
    trained = load(model_dir)
    model, norm = trained.model, trained.normalizer
    assert norm is not None
    lm = resolve_model(str(llama))
    points = capture_points(lm.model)
    windows = list(limit_rows(iter_windows(TextConfig(**TEXT), lm.tokenizer, T), tokens))
    out = torch.zeros(len(windows), T, L, F)
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            group = windows[start : start + batch]
            ids = torch.as_tensor(np.stack([w.token_ids for w in group]))
            keep = torch.as_tensor(np.stack([w.keep for w in group]))
            inputs, _ = capture_with_hooks(lm.model, points, ids)
            for layer in range(L):
                x = (inputs[:, :, layer][keep] - norm.inputs_mean[layer]) / norm.inputs_std[layer]
                pre = x @ model.W_enc[layer].T + model.b_enc[layer]
                if model.config.activation_fn == "jumprelu":
                    acts = pre * (pre > model.threshold[layer])
                elif model.config.activation_fn == "relu":
                    acts = pre.clamp_min(0)
                else:
                    cut = pre.flatten().topk(int(model.config.k * pre.shape[0])).values.min()
                    acts = pre * ((pre >= cut) & (pre > 0))
                dense = torch.zeros(len(group), T, F)
                dense[keep] = acts
                out[start : start + len(group), :, layer] = dense
    return windows, out


def read_spec(features_dir: Path, layer: int, index: int) -> dict:
    """The viewer's read, from the format's description alone: index -> byte range -> <I length -> gzip JSON."""
    index_data = json.loads(gzip.decompress((features_dir / "index.json.gz").read_bytes()))
    entry = index_data[str(layer)]
    start, stop = entry["offsets"][index], entry["offsets"][index + 1]
    raw = (features_dir / entry["filename"]).read_bytes()[start:stop]
    (length,) = struct.unpack("<I", raw[:4])
    assert length == len(raw) - 4
    return json.loads(gzip.decompress(raw[4 : 4 + length]))


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk"])
def test_the_statistics_equal_a_brute_force_dense_computation(
    model_dirs: dict[str, Path], tiny_dirs: dict[str, Path], activation: str
) -> None:
    tokens, batch, K = 300, 4, 5
    config = FeaturesConfig(text="packaged:kjv", tokens=tokens, batch_size=batch, examples=K, reservoir=512,
                            device="cpu")  # fmt: skip
    collector, run, _ = collect_features(load(model_dirs[activation]), config, progress=False)
    windows, acts = brute_force(model_dirs[activation], tiny_dirs["llama"], tokens, batch)
    assert collector.tokens == tokens and run["windows"] == len(windows)
    by_index = {w.index: i for i, w in enumerate(windows)}
    for layer in range(L):
        result = collector.result(layer)
        a = acts[:, :, layer]  # [W, T, F]
        fires = a > 0
        np.testing.assert_array_equal(result.count, fires.sum((0, 1)).numpy())
        assert activation != "jumprelu" or 0 < result.count.sum() < 0.5 * tokens * F  # sparse, not all dead
        assert set(np.flatnonzero(result.count == 0)) >= set(DEAD)
        w_max = a.amax(1)  # [W, F]: each window's largest activation
        for f in range(F):
            values = a[..., f][fires[..., f]]
            if values.numel() == 0:
                assert result.top[f] == [] and result.quantile[f] == [] and result.act_max[f] == 0
                continue
            torch.testing.assert_close(float(result.act_max[f]), float(values.max()), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(float(result.act_min[f]), float(values.min()), rtol=1e-6, atol=1e-6)
            # the top K windows by their largest activation, each once, with all their per-token activations
            best = w_max[:, f][w_max[:, f] > 0].sort(descending=True).values[:K]
            got = torch.tensor([v for v, _, _, _ in result.top[f]])
            torch.testing.assert_close(got, best, rtol=1e-6, atol=1e-6)
            assert len({w for _, w, _, _ in result.top[f]}) == len(result.top[f])
            for value, window, pos, per_token in result.top[f]:
                row = a[by_index[window], :, f]
                torch.testing.assert_close(torch.from_numpy(per_token), row, rtol=1e-6, atol=1e-6)
                assert float(row[pos]) == pytest.approx(value, abs=1e-6)
            # the reservoir held every nonzero activation: the histogram and quantiles are exact
            torch.testing.assert_close(torch.from_numpy(np.sort(result.reservoir[f])), values.sort().values,
                                       rtol=1e-6, atol=1e-6)  # fmt: skip
            # quantile examples: windows that fire, at their largest activation
            for value, window, _, _ in result.quantile[f]:
                assert float(w_max[by_index[window], f]) == pytest.approx(value, abs=1e-6)


def test_the_files_round_trip_and_match_brute_force(model_dirs: dict[str, Path], tiny_dirs: dict[str, Path],
                                                    tmp_path: Path) -> None:  # fmt: skip
    tokens, bins, hist_bins = 300, 4, 16
    config = FeaturesConfig(text="packaged:kjv", tokens=tokens, batch_size=4, examples=3, quantile_bins=bins,
                            quantile_examples=2, histogram_bins=hist_bins, per_feature_json=True,
                            device="cpu")  # fmt: skip
    summary = write_features(model_dirs["jumprelu"], tmp_path / "out", config, progress=False)
    _, acts = brute_force(model_dirs["jumprelu"], tiny_dirs["llama"], tokens, 4)
    out = tmp_path / "out"
    index = json.loads(gzip.decompress((out / "features" / "index.json.gz").read_bytes()))
    assert sorted(index) == [str(i) for i in range(L)]
    for layer in range(L):
        entry = index[str(layer)]
        offsets = entry["offsets"]
        assert entry["filename"] == f"layer_{layer}.bin" and len(offsets) == F + 1 and offsets[0] == 0
        assert offsets == sorted(offsets) and offsets[-1] == (out / "features" / entry["filename"]).stat().st_size
        lines = [json.loads(line) for line in (out / "jsonl" / f"layer_{layer}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in lines] == list(range(F))
        a = acts[:, :, layer]
        for f in range(F):
            record = read_spec(out / "features", layer, f)
            assert record == lines[f] == json.loads((out / "features" / f"{cantor(layer, f)}.json").read_text())
            for key in ("transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min",
                        "act_max", "quantile_values", "histogram", "activation_frequency"):  # fmt: skip
                assert key in record
            values = a[..., f][a[..., f] > 0].double().numpy()
            assert record["activation_frequency"] == values.size / tokens
            assert len(record["top_logits"]) == len(record["bottom_logits"]) == 10
            if values.size == 0:
                assert f in summary["dead"][str(layer)] and record["examples_quantiles"] == []
                assert record["histogram"] == [0.0] * hist_bins and record["quantile_values"] == []
                continue
            assert f not in summary["dead"][str(layer)]
            lo, hi = values.min(), values.max()
            assert record["act_min"] == pytest.approx(lo, abs=1e-6) and record["act_max"] == pytest.approx(hi, abs=1e-6)
            # the viewer's histogram rule over [act_min, act_max], on every nonzero activation
            rule = np.clip(np.floor((values - lo) / max(hi - lo, 1e-30) * hist_bins), 0, hist_bins - 1).astype(int)
            assert record["histogram"] == np.bincount(rule, minlength=hist_bins).astype(float).tolist()
            np.testing.assert_allclose(record["quantile_values"], np.quantile(values, np.arange(1, 101) / 100),
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
            groups = record["examples_quantiles"]
            assert groups[0]["quantile_name"] == "Top activations"
            top = [max(e["tokens_acts_list"]) for e in groups[0]["examples"]]
            best = np.sort(a[..., f].amax(1).numpy())[::-1][: len(top)]
            np.testing.assert_allclose(top, best, atol=1e-4)
            width = (hi - lo) / bins
            for group in groups:
                for e in group["examples"]:
                    assert len(e["tokens"]) == len(e["tokens_acts_list"]) == T
                    assert e["tokens_acts_list"][e["train_token_ind"]] == pytest.approx(max(e["tokens_acts_list"]))
                if group is groups[0]:
                    continue
                b = bins - int(group["quantile_name"].split()[1])  # "Interval n (...)": n = 1 is the top bin
                for e in group["examples"]:
                    v = e["tokens_acts_list"][e["train_token_ind"]]
                    assert lo + b * width - 1e-4 <= v <= lo + (b + 1) * width + 1e-4
    assert all(isinstance(t, str) for t in record["examples_quantiles"][0]["examples"][0]["tokens"])
    assert summary["tokens"] == tokens and summary["dead_per_layer"] == [len(summary["dead"][str(i)]) for i in range(L)]
    for layer in range(L):
        dead = sorted(int(f) for f in np.flatnonzero((acts[:, :, layer] > 0).sum((0, 1)).numpy() == 0))
        assert summary["dead"][str(layer)] == dead and set(DEAD) <= set(dead)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and saved["model_dir"] == str(model_dirs["jumprelu"]) and saved["text"] == "packaged:kjv"


def test_the_state_does_not_grow_with_the_tokens() -> None:
    """Sparse random activations, 2,000 windows: the tensors keep their size, token ids only of referenced windows;
    the top windows are still the true top ones."""
    Lc, Fc, Tc, B = 2, 3, 8, 4
    collector = FeatureCollector(Lc, Fc, Tc, examples=2, quantile_bins=2, quantile_examples=1, reservoir=8)
    gen = torch.Generator().manual_seed(0)
    tensor_bytes, best = None, torch.zeros(Lc, Fc)
    for step in range(500):
        keep = np.ones((B, Tc), dtype=bool)
        keep[:, 0] = False
        windows = [PackedWindow(np.arange(Tc) + step, keep[i], step * B + i) for i in range(B)]
        n = int(keep.sum())
        acts = [torch.rand(n, Fc, generator=gen) * (torch.rand(n, Fc, generator=gen) < 0.1) for _ in range(Lc)]
        collector.add(windows, acts)
        for layer in range(Lc):
            best[layer] = torch.maximum(best[layer], acts[layer].amax(0))
        size = sum(s.nbytes() for s in collector.layers)
        assert tensor_bytes in (None, size)
        tensor_bytes = size
        slots = Lc * Fc * (2 + 2)
        assert len(collector.window_tokens) <= 2 * slots + 64 + B
    collector.prune()
    assert collector.tokens == 500 * B * (Tc - 1) and len(collector.window_tokens) <= slots
    assert collector.state_bytes() <= tensor_bytes + slots * Tc * 4
    for layer in range(Lc):
        result = collector.result(layer)
        assert [top[0][0] for top in result.top] == pytest.approx(best[layer].tolist())
        assert all(len(r) == 8 for r in result.reservoir) and (result.count > 8).all()
        for f in range(Fc):  # a full reservoir: a sample of the feature's activations, scaled to its true count
            sample = result.reservoir[f]
            assert (sample > 0).all() and sample.max() <= result.act_max[f] and sample.min() >= result.act_min[f]
            counts = histogram(sample, int(result.count[f]), float(result.act_min[f]), float(result.act_max[f]), 4)
            assert sum(counts) == pytest.approx(result.count[f])


def test_logits_are_the_decoder_direction_through_the_final_norm_weight_and_unembedding(
    model_dirs: dict[str, Path], tiny_dirs: dict[str, Path]
) -> None:
    trained = load(model_dirs["jumprelu"])
    lm = resolve_model(str(tiny_dirs["llama"]))
    model, norm = trained.model, trained.normalizer
    assert norm is not None
    w = lm.model.model.norm.weight
    W_U = lm.model.lm_head.weight
    for layer in range(L):
        top, bottom = logit_tokens(lm.model, model, norm, layer, 5)
        for f in (4, 17):
            v = sum(model.W_dec[layer][f, j] * norm.targets_std[layer + j] for j in range(L - layer))
            logits = W_U @ (w * v)  # RMSNorm: a positive scale of w ⊙ v, which keeps the order
            assert top[f].tolist() == logits.topk(5).indices.tolist()
            assert bottom[f].tolist() == logits.topk(5, largest=False).indices.tolist()


def test_bad_input_is_one_line(model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--out", str(tmp_path / "out"), "--text", "packaged:kjv", "--quiet"]
    cases = [
        (["features", str(tmp_path / "missing"), "--tokens", "10", *base], "does not exist"),
        (["features", str(model_dirs["jumprelu"]), "--tokens", "0", *base], "tokens"),
        (["features", str(model_dirs["jumprelu"]), "--tokens", "1000000", *base], "more than the text"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and err.startswith("clt features: error:"), err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="tokens"):
        FeaturesConfig.from_dict({"tokens": -1})


def test_clt_features_end_to_end(model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "feat"
    argv = ["features", str(model_dirs["batchtopk"]), "--out", str(out), "--tokens", "200", "--text", "packaged:kjv",
            "--examples", "4", "--batch-size", "3", "--context-size", "24", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "features over 200 tokens" in printed and "dead" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 200 and summary["context_size"] == 24 and summary["activation_fn"] == "batchtopk"
    assert summary["settings"]["examples"] == 4 and summary["dead_total"] == sum(summary["dead_per_layer"])
    record = read_spec(out / "features", 2, 5)
    assert record["index"] == 5 and all(len(g["examples"]) <= 4 for g in record["examples_quantiles"][:1])
    assert not any(out.glob("features/*.json"))  # per-feature JSON only when asked for
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # an existing --out is refused...
    assert main([*argv, "--overwrite"]) == 0  # ...unless replaced
