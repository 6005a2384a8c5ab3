"""`attribute` end to end through circuit-tracer's own venv on a tiny Llama and a tiny random JumpReLU CLT.

The tiny Llama is made like SmolLM2 where it matters to circuit-tracer: tied LM head and rope_theta 100,000 (which
transformers 4.57 would silently replace by 10,000 from a transformers-5 config.json). Checks: the graph files parse;
circuit-tracer's logits equal our transformers-5 logits; the replacement model with error nodes is exact; each logit
row sums (with the non-node constant part) to the demeaned logit; top features' direct effects match interventions.
Run with `nice -n 10 .venv/bin/pytest -q -m slow tests/integration/test_attribution_graph.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama_config, tiny_tokenizer

from clt_core.attribution import AttributeConfig, attribute, circuit_tracer_python
from clt_core.data.sampler import Normalizer
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import save

pytestmark = pytest.mark.slow
PROMPT = "In the beginning God created the heaven and the earth."
L, D, F = 3, 64, 48


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(n_layer=L, d_model=D)
    config.tie_word_embeddings = True
    config.rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("lm") / "tiny-llama-tied"
    LlamaForCausalLM(config).eval().save_pretrained(out)
    tiny_tokenizer(out)
    return out


def make_clt_dir(path: Path, lm_dir: Path, activation: str = "jumprelu") -> Path:
    torch.manual_seed(0)
    config = CLTConfig(num_layers=L, d_model=D, num_features=F, activation_fn=activation, k=4)
    model = CrossLayerTranscoder(config)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
        if model.log_threshold is not None:
            model.log_threshold.copy_(torch.rand(L, F).mul(0.3).add(0.05).log())
    norm = Normalizer(torch.randn(L, D) * 0.1, torch.rand(L, D) + 0.5, torch.randn(L, D) * 0.1, torch.rand(L, D) + 0.5)
    source = {
        "data": "/stores/tiny",
        "store": {
            "model": {"name": str(lm_dir), "architecture": "llama"},
            "hook_templates": {
                "input_template": "model.layers.{layer}.mlp",
                "input_kind": "input",
                "output_template": "model.layers.{layer}.mlp",
                "output_kind": "output",
            },
            "extraction": {"text": {"add_bos": True, "bos_token": None}},
        },
    }
    save(path, model, norm, source)
    return path


def test_attribute_end_to_end(tmp_path: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        circuit_tracer_python()
    except Exception as err:
        pytest.skip(str(err))
    monkeypatch.setenv("CLT_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = make_clt_dir(tmp_path / "clt", lm_dir)
    config = AttributeConfig(prompt=PROMPT, max_feature_nodes=None, check_features=3, device="cpu", slug="kjv")
    result = attribute(model_dir, tmp_path / "out", config)
    out, s = result.out, result.summary

    # The viewer's files parse and describe the graph.
    graph = json.loads((out / "graph" / "kjv.json").read_text())
    assert graph["metadata"]["slug"] == "kjv" and graph["nodes"] and graph["links"]
    assert {n["feature_type"] for n in graph["nodes"]} >= {"embedding", "logit"}
    metadata = json.loads((out / "graph" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in metadata["graphs"]] == ["kjv"]
    assert (out / "graph.pt").is_file() and (out / "transcoders" / "W_enc_0.safetensors").is_file()
    tensors = load_file(str(out / "graph.safetensors"))
    n_pos = len(result.token_ids)
    n_nodes = s["selected_features"] + (L + 1) * n_pos + len(s["logit_targets"])
    assert tensors["adjacency_matrix"].shape == (n_nodes, n_nodes)
    assert tensors["input_tokens"].tolist() == result.token_ids == s["token_ids"]
    assert result.token_ids[0] == 1  # the tiny tokenizer's <|bos|>, ours, not one circuit-tracer picked
    assert s["selected_features"] == s["active_features"] > 0
    assert s["tied_embeddings"] is True

    # circuit-tracer's transformers 4.57 runs the same model as our transformers 5 (rope_theta, tied head).
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ours(torch.tensor([result.token_ids])).logits[0, -1]
    theirs = torch.tensor(s["checks"]["replacement"]["last_logits_own"])
    assert torch.allclose(theirs, logits[: len(theirs)], atol=1e-4), (theirs, logits[:8])
    probs = torch.softmax(logits, -1)
    for target in s["logit_targets"]:
        assert abs(probs[target["id"]].item() - target["probability"]) < 1e-4

    checks = s["checks"]
    assert not any("error" in c for c in checks.values()), checks
    rep = checks["replacement"]
    assert rep["max_abs_logit_diff"] < 1e-4 * max(1.0, rep["logit_scale"]), rep
    assert rep["traced_vs_own_max_abs_diff"] < 1e-4 * max(1.0, rep["logit_scale"]), rep
    comp = checks["completeness"]
    assert comp["all_features_selected"] and comp["max_abs_residual"] < 1e-4 * max(1.0, comp["scale"]), comp
    assert any(abs(x) > 1e-3 for x in comp["graph_row_sums"])  # the graph carries real effects
    inter = checks["interventions"]
    assert inter["checked"] == 3 and inter["max_abs_error"] < 1e-4 * max(1.0, inter["scale"]), inter

    # A second run reuses the export and refuses to overwrite the graph unless asked.
    stamp = (out / "transcoders" / "W_enc_0.safetensors").stat().st_mtime_ns
    again = attribute(model_dir, out, config.model_copy(update={"check_features": 0, "save_pt": False}), overwrite=True)
    assert (out / "transcoders" / "W_enc_0.safetensors").stat().st_mtime_ns == stamp
    assert again.summary["checks"]["interventions"] == {"checked": 0}
