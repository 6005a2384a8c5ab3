"""The live source: batches computed by the language model as training runs (clt_core/extract/live.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from clt_core.convert.converter import ConvertConfig, convert
from clt_core.data.sampler import SamplerConfig, held_out_batches
from clt_core.data.store import ActivationStore
from clt_core.errors import CLTError
from clt_core.evaluate.reconstruction import evaluate_model
from clt_core.extract.extractor import extract
from clt_core.extract.live import LiveConfig, LiveSource
from clt_core.lm.corpora import TextConfig
from clt_core.train.config import TrainConfig
from clt_core.train.step import TrainStep
from clt_core.train.trainer import checkpoints, train

T = 16  # context size


def live(model: Path, **overrides: Any) -> LiveConfig:
    settings: dict[str, Any] = {
        "model": str(model),
        "text": TextConfig(source="packaged:kjv", max_documents=40),
        "tokens": 1500,
        "context_size": T,
        "forward_batch": 4,
        "shuffle_rows": 256,
        "shuffle_windows": 32,
        "held_out_tokens": 300,
        "compute_dtype": "float32",
    }
    return LiveConfig(**{**settings, **overrides})


def row_keys(inputs: torch.Tensor, targets: torch.Tensor) -> list[bytes]:
    """Each row's bits (bf16 viewed as int16), to compare rows exactly whatever their order."""
    bits = [t.view(torch.int16).numpy() for t in (inputs, targets)]
    return [x.tobytes() + y.tobytes() for x, y in zip(*bits, strict=True)]


def test_the_stream_is_the_extracted_rows_after_the_held_out_ones_shuffled(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = live(tiny_dirs["llama"], tokens=1200)
    sampler = SamplerConfig(batch_size=100, normalization_method="none", seed=3)
    with LiveSource(cfg, sampler, progress=False) as source:
        batches = [next(source) for _ in range(12)]
    extract(str(tmp_path / "s"), cfg.extract_config(cfg.held_out_tokens + cfg.tokens), progress=False)
    stored = ActivationStore.open(str(tmp_path / "s")).read(cfg.held_out_tokens, cfg.held_out_tokens + cfg.tokens)
    got_ids = torch.cat([b.token_ids for b in batches])
    assert sorted(got_ids.tolist()) == sorted(stored.token_ids.tolist())
    assert not torch.equal(got_ids, stored.token_ids), "shuffled, not in corpus order"
    got = row_keys(torch.cat([b.inputs for b in batches]), torch.cat([b.targets for b in batches]))
    assert sorted(got) == sorted(row_keys(stored.inputs, stored.targets)), "the same rows, bit for bit"
    # positions in the stream mix windows from all over a span: the first batch holds rows of many windows
    assert len(set(batches[0].token_ids.tolist())) > 40

    # Normalised (by the first buffer's moments, the warm-up): the store's rows normalised the same way, exactly.
    with LiveSource(cfg, sampler.model_copy(update={"normalization_method": "auto"}), progress=False) as source:
        normalised = [next(source) for _ in range(12)]
        assert source.normalizer is not None
        store = ActivationStore.open(str(tmp_path / "s"))
        rows = (cfg.held_out_tokens, cfg.held_out_tokens + cfg.tokens)
        expected = list(held_out_batches(store, source.normalizer, rows=rows, sampler=SamplerConfig()))
    got = row_keys(torch.cat([b.inputs for b in normalised]), torch.cat([b.targets for b in normalised]))
    want = row_keys(torch.cat([b.inputs for b in expected]), torch.cat([b.targets for b in expected]))
    assert sorted(got) == sorted(want)


def test_norm_stats_come_from_the_first_buffer_and_batches_are_normalised(tiny_dirs: dict[str, Path]) -> None:
    cfg = live(tiny_dirs["llama"], compute_dtype="bfloat16")
    with LiveSource(cfg, SamplerConfig(batch_size=256), progress=False) as source:
        first = next(source)
        assert source.normalizer is not None
        assert first.inputs.dtype == torch.bfloat16
        x = first.inputs.float()
        assert abs(x.mean()) < 0.1 and 0.8 < x.std() < 1.2


def train_config(model: Path, out: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "live": live(model),
        "output_dir": str(out),
        "model": {"num_features": 64, "activation_fn": "batchtopk", "k": 4},
        "sampler": {"batch_size": 100},
        "learning_rate": 1e-3,
        "log_interval": 1,
        "eval_interval": 5,
        "checkpoint_interval": 5,
        "eval_rows": 200,
    }
    return TrainConfig.model_validate({**settings, **overrides})


def step_losses(out: Path) -> dict[int, float]:
    import json

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics"]["loss/total"] for r in lines if "metrics" in r and "loss/total" in r["metrics"]}


def test_a_live_run_trains_evaluates_and_resumes_bit_for_bit(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = train_config(tiny_dirs["llama"], tmp_path / "whole")
    assert cfg.training_steps == 15  # 1500 tokens / 100 a batch
    whole = train(cfg, progress=False)
    assert whole.steps == 15 and whole.evaluation["mean_nmse"] < 1.0
    held_out = ActivationStore.open(str(tmp_path / "whole" / "held_out"))
    assert held_out.num_rows == 300
    norm = load_file(str(whole.final / "normalization.safetensors"))
    assert set(norm) >= {"inputs_mean", "inputs_std"}

    calls = {"n": 0}
    real_step = TrainStep.__call__

    def interrupt_at_step_8(self: TrainStep, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(TrainStep, "__call__", interrupt_at_step_8)
    resumed_cfg = train_config(tiny_dirs["llama"], tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train(resumed_cfg, progress=False)
    monkeypatch.setattr(TrainStep, "__call__", real_step)
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["step_5"]
    resumed = train(resumed_cfg, resume=True, progress=False)
    assert step_losses(whole.output_dir) == step_losses(resumed.output_dir)
    wa, wb = load_file(str(whole.final / "model.safetensors")), load_file(str(resumed.final / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_live_model_converts_and_evaluates_on_all_its_held_out_rows(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """OUT/held_out holds only held-out rows: conversion fits on its first half, evaluation scores the second."""
    run = train(train_config(tiny_dirs["llama"], tmp_path / "run", checkpoint_interval=100), progress=False)
    report = convert(run.final, tmp_path / "jumprelu", ConvertConfig(batches=4), progress=False)
    assert (report["fit_rows"], report["eval_rows"]) == (150, 150)  # 300 held-out rows
    evaluation = evaluate_model(tmp_path / "jumprelu")
    assert evaluation["held_out_rows"] == [150, 300] and evaluation["holdout_fraction"] == 1.0
    # a share asked for explicitly is that tail of the store's chunks, as in any store
    half = convert(run.final, tmp_path / "half", ConvertConfig(holdout_fraction=0.5, batches=4), progress=False)
    assert (half["fit_rows"], half["eval_rows"]) == (70, 70)  # chunks of 32 rows: the last 5 of 10, rows 160..300


def test_bad_live_input_is_one_clear_line(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CLTError, match="more than the corpus"):
        LiveSource(live(tiny_dirs["llama"], tokens=10**8), SamplerConfig(), progress=False)
    with pytest.raises(CLTError, match="no module"):
        no_mlp = live(tiny_dirs["llama"], input_template="model.layers.{layer}.nope")
        LiveSource(no_mlp, SamplerConfig(), progress=False)
    with pytest.raises(CLTError, match="either data"):
        TrainConfig.from_dict({"data": str(tmp_path), "live": {"tokens": 100}})
    with pytest.raises(CLTError, match="less than one batch"):
        TrainConfig.from_dict({"live": {"tokens": 100}, "sampler": {"batch_size": 4096}})


def test_the_pipeline_source_and_its_training_settings_must_agree() -> None:
    from flows.config import PipelineConfig

    live_train = {"live": {"model": "m", "text": {"source": "packaged:kjv"}, "tokens": 8192}}
    assert PipelineConfig.from_dict({"source": "live", "train": live_train}).train.live is not None
    with pytest.raises(CLTError, match=r"needs train\.live"):
        PipelineConfig.from_dict({"source": "live"})
    with pytest.raises(CLTError, match="set source: live"):
        PipelineConfig.from_dict({"train": live_train})
    no_held_out = {"live": {**live_train["live"], "held_out_tokens": 0}}
    with pytest.raises(CLTError, match="held_out_tokens"):
        PipelineConfig.from_dict({"source": "live", "train": no_held_out})


def test_a_corpus_of_several_sources_extracts_and_is_recorded_by_name(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    text = TextConfig(source=["packaged:kjv", "packaged:kjv"], shuffle_documents=1, max_documents=40)
    extract(str(tmp_path / "s"), live(tiny_dirs["llama"], text=text).extract_config(200), progress=False)
    assert ActivationStore.open(str(tmp_path / "s")).info.text_dataset == "packaged:kjv + packaged:kjv"
