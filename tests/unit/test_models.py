"""Model loading, capture presets and the plain-hook reference capture, on tiny random models (no network)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from tiny_models import MAX_CONTEXT, TINY_CONFIGS, tiny_gpt2, tiny_model

from clt_core.errors import CLTError
from clt_core.lm import loading as models
from clt_core.lm.capture import PRESETS, CapturePoints, capture_points, capture_with_hooks
from clt_core.lm.loading import ALIASES, SOURCE_FILE, ModelError, hash_files, resolve_model


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, CLTError)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------- load


@pytest.mark.parametrize(("kind", "layers"), [("gpt2", 2), ("llama", 3)])
def test_tiny_models_load_by_path(tiny_dirs: dict[str, Path], kind: str, layers: int) -> None:
    lm = resolve_model(str(tiny_dirs[kind]))
    assert (lm.architecture, lm.num_layers, lm.d_model, lm.max_context) == (kind, layers, 64, MAX_CONTEXT)
    assert lm.name == str(tiny_dirs[kind].resolve()) and lm.path == tiny_dirs[kind].resolve()
    assert lm.weights_hash == sha256(tiny_dirs[kind] / "model.safetensors")
    assert not lm.model.training and lm.model.dtype == torch.float32
    assert not any(p.requires_grad for p in lm.model.parameters())
    text = "In the beginning God created the heaven and the earth."
    ids = lm.tokenizer(text).input_ids
    assert lm.tokenizer.decode(ids) == text and lm.tokenizer.bos_token_id not in ids  # adds no BOS
    assert lm.model(torch.tensor([ids])).logits.shape == (1, len(ids), lm.tokenizer.vocab_size)


def test_loads_in_parallel_threads_keep_tied_weights(tiny_dirs: dict[str, Path]) -> None:
    """from_pretrained swaps PreTrainedModel.tie_weights for a no-op while it builds a model; overlapping loads in
    threads (parallel shards in one Prefect worker) once left the no-op in place, and every later tied model loaded
    with its LM head on the meta device."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import PreTrainedModel

    original = PreTrainedModel.tie_weights
    try:
        with ThreadPoolExecutor(4) as pool:
            loaded = list(pool.map(lambda _: resolve_model(str(tiny_dirs["gpt2"])), range(16)))
        assert PreTrainedModel.tie_weights is original
    finally:
        PreTrainedModel.tie_weights = original  # never leave the rest of the session broken
    later = resolve_model(str(tiny_dirs["gpt2"]))
    assert all(m.model.lm_head.weight is m.model.transformer.wte.weight for m in [*loaded, later])


def test_dtype_is_applied(tiny_dirs: dict[str, Path]) -> None:
    lm = resolve_model(str(tiny_dirs["llama"]), dtype=torch.bfloat16)
    assert lm.model.dtype == torch.bfloat16
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_weights_hash_is_stable_and_cached(tiny_dirs: dict[str, Path], isolated_cache: Path, tmp_path: Path) -> None:
    first = resolve_model(str(tiny_dirs["gpt2"])).weights_hash
    assert len(list((isolated_cache / "hashes").glob("*.json"))) == 1
    assert resolve_model(str(tiny_dirs["gpt2"])).weights_hash == first
    # The same weights saved again hash the same; other weights hash differently (the cache keys on size/mtime/inode).
    assert resolve_model(str(tiny_gpt2(tmp_path / "again"))).weights_hash == first
    assert resolve_model(str(tiny_gpt2(tmp_path / "other", seed=1))).weights_hash != first


def test_sharded_weights_hash_is_sha256sum_of_shards(tmp_path: Path) -> None:
    a, b = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    a.write_bytes(b"first shard")
    b.write_bytes(b"second shard")
    lines = f"{sha256(a)}  {a.name}\n{sha256(b)}  {b.name}\n"
    assert hash_files([b, a]) == hashlib.sha256(lines.encode()).hexdigest()
    assert hash_files([a]) == sha256(a)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("/no/such/model", "model path not found: /no/such/model"),
        ("./missing-model", "model path not found"),
        ("missing.gguf", "model path not found"),
        ("not a valid id!", "nor a valid Hugging Face hub id"),
    ],
)
def test_unknown_model_is_one_clear_line(spec: str, expected: str) -> None:
    with pytest.raises(ModelError) as excinfo:
        resolve_model(spec)
    assert expected in one_line_error(excinfo)


def test_hub_id_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelError) as excinfo:
        resolve_model("some-org/some-model")
    message = one_line_error(excinfo)
    assert message.startswith(
        "model 'some-org/some-model' is not a local path, GGUF file or known alias (smollm2-135m), and the Hugging "
        "Face hub is unreachable (offline"
    )
    assert time.perf_counter() - started < 5


def test_not_a_model_directory_or_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        resolve_model(str(tmp_path))
    assert "has no config.json" in one_line_error(excinfo)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError) as excinfo:
        resolve_model(str(tmp_path / "notes.txt"))
    assert "not a .gguf file" in one_line_error(excinfo)


def test_transformers_4_is_refused(monkeypatch: pytest.MonkeyPatch, tiny_dirs: dict[str, Path]) -> None:
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ModelError) as excinfo:
        resolve_model(str(tiny_dirs["gpt2"]))
    assert "needs transformers 5.x, found 4.57.1" in one_line_error(excinfo)


def _fake_gguf(tmp_path: Path, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[int]]:
    """An alias whose 'GGUF' loads as the tiny Llama, counting conversions (the GGUF reader itself is slow-tested)."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF pretend weights")
    calls: list[int] = []

    def read_gguf(path: Path, dtype: torch.dtype) -> tuple[object, object]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert path == gguf
        calls.append(1)
        return (
            AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=dtype),
            AutoTokenizer.from_pretrained(tiny_dirs["llama"]),
        )

    monkeypatch.setattr(models, "_read_gguf", read_gguf)
    monkeypatch.setitem(ALIASES, "tiny-alias", lambda: gguf)
    return gguf, calls


def test_alias_converts_once_into_the_cache(
    tiny_dirs: dict[str, Path], isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf, calls = _fake_gguf(tmp_path, tiny_dirs, monkeypatch)
    lm = resolve_model("TINY-ALIAS")
    digest = sha256(gguf)
    assert lm.path == isolated_cache / "models" / f"tiny-alias-{digest[:12]}"
    assert (lm.name, lm.weights_hash, lm.num_layers, calls) == ("tiny-alias", digest, 3, [1])
    assert json.loads((lm.path / SOURCE_FILE).read_text())["sha256"] == digest
    assert resolve_model("tiny-alias").weights_hash == digest and calls == [1]  # reused, not converted again
    assert [p.name for p in (isolated_cache / "models").iterdir() if p.is_dir()] == [lm.path.name]  # no temp left


def test_killed_conversion_leaves_no_cache(
    tiny_dirs: dict[str, Path], isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf, calls = _fake_gguf(tmp_path, tiny_dirs, monkeypatch)
    target = isolated_cache / "models" / f"tiny-alias-{sha256(gguf)[:12]}"
    target.mkdir(parents=True)  # a half directory (no clt_source.json), as a crash of an older version could leave
    (target / "config.json").write_text("{}")
    stale = target.with_name(f".{target.name}.tmp-killed")  # what SIGKILL during a conversion leaves
    stale.mkdir()

    def die(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("transformers.PreTrainedModel.save_pretrained", die)
        with pytest.raises(KeyboardInterrupt):
            resolve_model("tiny-alias")
    # Both the killed run's temp directory and this run's are gone; the half directory is still not trusted.
    assert [p.name for p in (isolated_cache / "models").iterdir() if p.is_dir()] == [target.name]
    assert not (target / SOURCE_FILE).exists()
    assert resolve_model("tiny-alias").num_layers == 3 and len(calls) == 2  # the half directory was replaced
    assert (target / SOURCE_FILE).is_file()


# -------------------------------------------------------------------------------------------------------------- presets

EXPECTED_PRESETS = {
    "llama": ("model.layers.{layer}.mlp", "model.layers.{layer}.mlp"),
    "mistral": ("model.layers.{layer}.mlp", "model.layers.{layer}.mlp"),
    "qwen2": ("model.layers.{layer}.mlp", "model.layers.{layer}.mlp"),
    "gpt2": ("transformer.h.{layer}.mlp.c_fc", "transformer.h.{layer}.mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers.{layer}.mlp", "gpt_neox.layers.{layer}.mlp"),
    "gemma2": ("model.layers.{layer}.mlp", "model.layers.{layer}.post_feedforward_layernorm"),
}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_preset_validates_and_captures(model_type: str) -> None:
    model = tiny_model(model_type)
    points = capture_points(model)
    assert (points.input_kind, points.output_kind, points.num_layers) == ("input", "output", 2)
    if model_type in EXPECTED_PRESETS:
        assert (points.input_template, points.output_template) == EXPECTED_PRESETS[model_type]
    inputs, targets = capture_with_hooks(model, points, torch.randint(3, 128, (2, 5)))
    assert inputs.shape == targets.shape == (2, 5, 2, 32)
    assert inputs.dtype == targets.dtype == torch.float32


def test_every_required_architecture_has_a_preset() -> None:
    assert set(EXPECTED_PRESETS) <= set(PRESETS) <= set(TINY_CONFIGS)


def test_gemma2_target_is_the_normalised_mlp_output() -> None:
    model = tiny_model("gemma2")
    inputs, targets = capture_with_hooks(model, capture_points(model), torch.randint(3, 128, (1, 6)))
    for layer, block in enumerate(model.model.layers):
        assert torch.equal(targets[:, :, layer], block.post_feedforward_layernorm(block.mlp(inputs[:, :, layer])))


def test_bad_template_fails_with_candidates() -> None:
    model = tiny_model("llama")
    with pytest.raises(ModelError) as excinfo:
        capture_points(model, output_template="model.layers.{layer}.mlp_out")
    message = one_line_error(excinfo)
    assert "'model.layers.{layer}.mlp_out'" in message and "no module 'model.layers.0.mlp_out'" in message
    assert "candidates for layer 0: model.layers.0.mlp, model.layers.0.mlp.gate_proj" in message
    assert "model.layers.0.mlp.down_proj" in message


def test_template_missing_in_a_later_layer_names_that_layer() -> None:
    model = tiny_model("llama")
    del model.model.layers[1].mlp
    with pytest.raises(ModelError, match=r"no module 'model\.layers\.1\.mlp'.*candidates for layer 1"):
        capture_points(model)


@pytest.mark.parametrize("template", ["model.layers.0.mlp", "model.layers.{i}.mlp", "model.layers.{layer}.mlp{"])
def test_template_must_substitute_layer(template: str) -> None:
    with pytest.raises(ModelError) as excinfo:
        capture_points(tiny_model("llama"), input_template=template)
    assert repr(template) in one_line_error(excinfo)


def test_unknown_architecture_needs_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    monkeypatch.delitem(PRESETS, "llama")
    with pytest.raises(ModelError) as excinfo:
        capture_points(model)
    assert "no capture preset for architecture 'llama'" in one_line_error(excinfo)
    assert "model.layers.0.mlp" in str(excinfo.value)
    points = capture_points(model, "model.layers.{layer}.mlp", "model.layers.{layer}.mlp")
    assert points == CapturePoints("model.layers.{layer}.mlp", "model.layers.{layer}.mlp", num_layers=2)


# ---------------------------------------------------------------------------------------------------------------- hooks


def _batch(tokenizer: object, batch: int = 2, length: int = 24) -> torch.Tensor:
    ids = tokenizer("And God said, Let there be light: and there was light. " * 8).input_ids  # type: ignore[operator]
    return torch.tensor(ids[: batch * length]).view(batch, length)


def test_llama_hooks_match_recomputed_mlp(tiny_dirs: dict[str, Path]) -> None:
    lm = resolve_model(str(tiny_dirs["llama"]))
    input_ids = _batch(lm.tokenizer)
    inputs, targets = capture_with_hooks(lm.model, capture_points(lm.model), input_ids)
    assert inputs.shape == targets.shape == (2, 24, 3, 64)
    for layer, block in enumerate(lm.model.model.layers):
        assert torch.equal(targets[:, :, layer], block.mlp(inputs[:, :, layer]))
    assert targets.std() > 0.01  # not a degenerate all-zero model
    # The MLP input is the post-attention norm's output: read it as a module output through custom templates.
    norm = capture_points(lm.model, input_template="model.layers.{layer}.post_attention_layernorm", input_kind="output")
    assert torch.equal(capture_with_hooks(lm.model, norm, input_ids)[0], inputs)


def test_gpt2_c_fc_and_c_proj_are_the_mlp_input_and_output(tiny_dirs: dict[str, Path]) -> None:
    lm = resolve_model(str(tiny_dirs["gpt2"]))
    input_ids = _batch(lm.tokenizer)
    points = capture_points(lm.model)
    inputs, targets = capture_with_hooks(lm.model, points, input_ids)
    assert inputs.shape == targets.shape == (2, 24, 2, 64)
    whole = capture_points(lm.model, "transformer.h.{layer}.mlp", "transformer.h.{layer}.mlp")
    mlp_in, mlp_out = capture_with_hooks(lm.model, whole, input_ids)
    assert torch.equal(inputs, mlp_in) and torch.equal(targets, mlp_out)
    for layer, block in enumerate(lm.model.transformer.h):
        assert torch.equal(targets[:, :, layer], block.mlp(inputs[:, :, layer]))


def test_stopping_early_reads_the_same_values(tiny_dirs: dict[str, Path]) -> None:
    lm = resolve_model(str(tiny_dirs["llama"]), dtype=torch.bfloat16)
    input_ids = _batch(lm.tokenizer)
    points = capture_points(lm.model)
    early = capture_with_hooks(lm.model, points, input_ids)
    full = capture_with_hooks(lm.model, points, input_ids, attention_mask=torch.ones_like(input_ids), stop_early=False)
    assert early[0].dtype == torch.bfloat16
    assert torch.equal(early[0], full[0]) and torch.equal(early[1], full[1])


def test_module_called_twice_is_refused() -> None:
    model = tiny_model("llama")
    points = capture_points(model, output_template="model.layers.{layer}.mlp.act_fn")  # nn.SiLU runs once per layer
    capture_with_hooks(model, points, torch.randint(3, 128, (1, 4)))
    shared = model.model.layers[0].mlp.act_fn
    for block in model.model.layers:
        block.mlp.act_fn = shared
    with pytest.raises(ModelError, match="ran 2 times in one forward pass"):
        capture_with_hooks(model, points, torch.randint(3, 128, (1, 4)), stop_early=False)


# ----------------------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_generates() -> None:
    started = time.perf_counter()
    resolve_model("smollm2-135m")  # converts on the first run on this machine (~20 s), else reuses the cache
    first = time.perf_counter() - started
    started = time.perf_counter()
    lm = resolve_model("smollm2-135m")
    cached = time.perf_counter() - started
    print(f"smollm2-135m: first resolve {first:.1f} s, cached resolve {cached:.2f} s")
    assert cached < 3
    assert (lm.architecture, lm.num_layers, lm.d_model, lm.max_context) == ("llama", 30, 576, 8192)
    assert lm.weights_hash == sha256(models.smollm2_gguf_path())
    prompt = lm.tokenizer("The capital of France is", return_tensors="pt")
    out = lm.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, prompt.input_ids.shape[1] :])
    inputs, targets = capture_with_hooks(lm.model, capture_points(lm.model), prompt.input_ids)
    assert inputs.shape == targets.shape == (1, prompt.input_ids.shape[1], 30, 576)


def test_tracing_leaves_no_save_method_on_every_object(tiny_dirs: dict[str, Path]) -> None:
    """nnsight mounts `.save()` on `object` when imported; left there, a later `import beartype` (Prefect imports it
    lazily) fails with "unhashable type: 'instancemethod'"."""
    from clt_core.lm.capture import traced

    traced(resolve_model(str(tiny_dirs["llama"])).model)
    assert "save" not in object.__dict__
    import beartype  # noqa: F401  (fails if a mounted method is left on object)
