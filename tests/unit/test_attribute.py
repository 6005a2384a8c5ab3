"""`clt attribute` without circuit-tracer: arguments, refusals (one line each), the transformers-4.57 view of a
model directory, our BOS, and the export's threshold floor. The run itself: tests/integration/test_attribution_graph.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from model_dirs import make_model_dir
from safetensors.torch import load_file, save_file

from clt_core.attribution import AttributeConfig, attribute, circuit_tracer_model_dir, circuit_tracer_python, tokenize
from clt_core.attribution import run as ar
from clt_core.config import add_config_arguments, config_from_args
from clt_core.errors import ConfigError, ModelError
from clt_core.export import circuit_tracer as ct
from clt_core.export import export_circuit_tracer
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import save


@pytest.fixture
def fake_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An executable standing in for circuit-tracer's interpreter (never run by these tests)."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\nexit 3\n")
    python.chmod(0o755)
    monkeypatch.setenv(ar.PYTHON_ENV, str(python))
    return python


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_config_flags_and_validation() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_arguments(parser, AttributeConfig)
    args = parser.parse_args(
        ["--prompt", "The cat", "--max-feature-nodes", "64", "--dtype", "bfloat16", "--no-save-pt", "--slug", "x"]
    )
    config = config_from_args(AttributeConfig, args)
    assert (config.prompt, config.max_feature_nodes, config.dtype, config.save_pt) == ("The cat", 64, "bfloat16", False)
    assert AttributeConfig().max_n_logits == 10 and AttributeConfig().desired_logit_prob == 0.95
    with pytest.raises(ConfigError, match="desired_logit_prob"):
        AttributeConfig.from_dict({"desired_logit_prob": 0})
    with pytest.raises(ConfigError, match="unknown key 'threshold'"):
        AttributeConfig.from_dict({"threshold": 0.5})
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int8"])


def test_missing_circuit_tracer_venv_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ar.PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(ConfigError) as err:
        circuit_tracer_python()
    assert "make circuit-tracer-venv" in one_line(err)
    model_dir, _ = make_model_dir(tmp_path / "model")
    with pytest.raises(ConfigError, match="make circuit-tracer-venv"):
        attribute(model_dir, tmp_path / "out", AttributeConfig(prompt="hi"))
    monkeypatch.delenv(ar.PYTHON_ENV)
    root = Path(ar.__file__).resolve().parents[2]
    assert root / ".venv-circuit-tracer" / "bin" / "python" == ar.DEFAULT_PYTHON


def test_bad_inputs_are_refused(tmp_path: Path, fake_python: Path) -> None:
    with pytest.raises(ConfigError) as err:
        attribute(tmp_path / "missing", None, AttributeConfig(prompt="hi"))
    assert "model directory not found" in one_line(err)
    with pytest.raises(ConfigError, match="--prompt is empty"):
        attribute(tmp_path, None, AttributeConfig(prompt="  "))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a model directory"):
        attribute(tmp_path / "empty", None, AttributeConfig(prompt="hi"))


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_topk_models_are_refused(tmp_path: Path, fake_python: Path, activation: str) -> None:
    model_dir, _ = make_model_dir(tmp_path / "model", activation)
    with pytest.raises(ConfigError) as err:
        attribute(model_dir, tmp_path / "out", AttributeConfig(prompt="hi"))
    assert "convert to JumpReLU first" in one_line(err) and f"clt convert {model_dir}" in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="convert to JumpReLU first"):
        export_circuit_tracer(model_dir, tmp_path / "ct")


def test_a_model_without_a_language_model_is_refused(tmp_path: Path, fake_python: Path) -> None:
    model_dir, _ = make_model_dir(tmp_path / "model")
    source = json.loads((model_dir / "source.json").read_text())
    source["store"]["model"] = {}
    (model_dir / "source.json").write_text(json.dumps(source))
    with pytest.raises(ConfigError, match="names no language model; pass --model"):
        attribute(model_dir, tmp_path / "out", AttributeConfig(prompt="hi"))
    assert not (tmp_path / "out").exists()  # refused before the export
    with pytest.raises(ModelError, match="not a Hugging Face directory"):
        attribute(model_dir, tmp_path / "out", AttributeConfig(prompt="hi", model=str(tmp_path)))


def test_existing_graph_needs_overwrite(tmp_path: Path, fake_python: Path) -> None:
    model_dir, _ = make_model_dir(tmp_path / "model")
    (tmp_path / "out" / "graph").mkdir(parents=True)
    (tmp_path / "out" / "graph" / "g.json").write_text("{}")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        attribute(model_dir, tmp_path / "out", AttributeConfig(prompt="hi", slug="g"))


def test_view_for_transformers_4(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    view = circuit_tracer_model_dir(tiny_dirs["llama"])
    assert view.parent == Path(os.environ["CLT_CACHE_DIR"]) / "circuit-tracer-models"
    config = json.loads((view / "config.json").read_text())
    original = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "rope_parameters" not in config
    assert config["rope_theta"] == original["rope_parameters"]["rope_theta"] and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32"
    tok = json.loads((view / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tok
    assert (view / "model.safetensors").resolve() == (tiny_dirs["llama"] / "model.safetensors").resolve()
    assert circuit_tracer_model_dir(tiny_dirs["llama"]) == view  # reused
    rope = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 32}
    scaled = ar._config_for_transformers_4({"rope_parameters": rope})
    assert scaled == {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 32}}

    with pytest.raises(ModelError, match="architectures \\['GPT2LMHeadModel'\\]"):
        circuit_tracer_model_dir(tiny_dirs["gpt2"])
    untied = tmp_path / "untied"
    untied.mkdir()
    untied_config = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}
    (untied / "config.json").write_text(json.dumps(untied_config))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(untied / "model.safetensors"))
    with pytest.raises(ModelError, match=r"no lm_head\.weight"):
        circuit_tracer_model_dir(untied)


def test_tokens_start_with_our_bos(tiny_dirs: dict[str, Path]) -> None:
    ids = tokenize(tiny_dirs["llama"], "In the beginning", None)
    assert ids[0] == 1 and len(ids) > 2  # the tiny tokenizer's <|bos|>, which it does not add by itself
    assert tokenize(tiny_dirs["llama"], "In the beginning", "<|eos|>")[0] == 2
    with pytest.raises(ConfigError, match="not a single token"):
        tokenize(tiny_dirs["llama"], "x", "<|nope|>")
    store = {"extraction": {"text": {"bos_token": "<|eos|>"}}}
    assert ar.bos_token(AttributeConfig(), store, "any") == "<|eos|>"
    assert ar.bos_token(AttributeConfig(), {}, "smollm2-135m") == "<|endoftext|>"  # DEFAULT_BOS
    assert ar.bos_token(AttributeConfig(bos_token="<|bos|>"), store, "smollm2-135m") == "<|bos|>"
    assert ar.bos_token(AttributeConfig(), {}, "/some/dir") is None


def test_language_model_dir(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    assert ar.language_model_dir(str(tiny_dirs["llama"])) == tiny_dirs["llama"]
    with pytest.raises(ModelError, match="not a Hugging Face directory"):
        ar.language_model_dir(str(tmp_path))
    assert ar.slugify("The cat sat: on the mat!") == "the-cat-sat-on-the-mat" and ar.slugify("!!") == "graph"


def test_thresholds_are_float32_and_positive(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = CLTConfig(num_layers=2, d_model=4, num_features=3, activation_fn="jumprelu")
    model = CrossLayerTranscoder(config)
    with torch.no_grad():
        model.log_threshold.copy_(torch.tensor([[-200.0, -float("inf"), 0.0], [-2.0, float("inf"), -14.0]]))
    save(tmp_path / "model", model, None, {"store": {"model": {"name": "x"}}})
    with caplog.at_level(logging.WARNING):
        out = export_circuit_tracer(tmp_path / "model", tmp_path / "ct")
    assert "3 JumpReLU thresholds below 1e-06" in caplog.text
    t0, t1 = (load_file(str(out / f"W_enc_{i}.safetensors"))[f"threshold_{i}"] for i in range(2))
    assert t0.dtype == t1.dtype == torch.float32
    assert t0.tolist() == [pytest.approx(ct.MIN_THRESHOLD)] * 2 + [1.0]
    assert t1[0].item() == pytest.approx(torch.tensor(-2.0).exp().item()) and t1[1].item() == float("inf")
    assert t1[2].item() == pytest.approx(ct.MIN_THRESHOLD)  # exp(-14) = 8e-7 < 1e-6
    assert bool((torch.cat([t0, t1]).half() > 0).all())  # still positive in the dtypes circuit-tracer casts to
    with torch.no_grad():
        model.log_threshold[0, 0] = float("nan")
    save(tmp_path / "nan", model, None, {"store": {"model": {"name": "x"}}})
    with pytest.raises(ConfigError, match="1 JumpReLU thresholds are NaN"):
        export_circuit_tracer(tmp_path / "nan", tmp_path / "ct2")
