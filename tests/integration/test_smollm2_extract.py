"""The real default: `clt extract` with SmolLM2-135M (the GGUF shipped on PyPI) on the packaged King James Bible."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clt_core.cli import main
from clt_core.data.store import ActivationStore
from clt_core.data.verify import verify_store
from clt_core.lm.capture import capture_points, capture_with_hooks
from clt_core.lm.corpora import TextConfig
from clt_core.lm.loading import resolve_model
from clt_core.lm.windows import iter_windows, limit_rows

pytestmark = pytest.mark.slow

TOKENS = 3000
T = 128


def test_smollm2_extraction_of_a_packaged_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "smollm2")
    start = time.perf_counter()
    rc = main(["extract", "--quiet", "--out", url, "--model", "smollm2-135m", "--text", "packaged:kjv",
               "--tokens", str(TOKENS), "--context-size", str(T), "--batch-size", "8"])  # fmt: skip
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    print(f"smollm2-135m: {TOKENS} rows in {seconds:.1f} s: {out.strip()}")
    assert rc == 0 and f"holds {TOKENS:,} rows with norm stats" in out

    store = ActivationStore.open(url)
    assert (store.num_rows, store.num_layers, store.d_model, store.dtype) == (TOKENS, 30, 576, "bfloat16")
    info = store.info
    assert info.model["name"] == "smollm2-135m" and len(info.model["weights_hash"]) == 64
    assert info.hook_templates == {
        "input_template": "model.layers.{layer}.mlp",
        "input_kind": "input",
        "output_template": "model.layers.{layer}.mlp",
        "output_kind": "output",
    }
    assert info.context_size == T and info.text_dataset == "packaged:kjv"
    report = verify_store(url, progress=False)
    assert report.ok and not report.warnings, report.summary()

    # The first windows, captured again with plain forward hooks in the same dtype, give the same stored values.
    loaded = resolve_model("smollm2-135m", dtype=torch.bfloat16)
    text = TextConfig(source="packaged:kjv", bos_token="<|endoftext|>")
    windows = list(limit_rows(iter_windows(text, loaded.tokenizer, T), 8 * (T - 1)))
    ids = torch.from_numpy(np.stack([w.token_ids for w in windows]))
    keep = torch.from_numpy(np.stack([w.keep for w in windows]))
    assert (ids[:, 0] == loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>")).all()
    assert not keep[:, 0].any()
    inputs, targets = capture_with_hooks(loaded.model, capture_points(loaded.model), ids)
    rows = store.read(0, int(keep.sum()))
    assert torch.equal(rows.token_ids, ids[keep].int())
    assert torch.equal(rows.inputs, inputs[keep].to(torch.bfloat16))
    assert torch.equal(rows.targets, targets[keep].to(torch.bfloat16))
    stats = store.read_norm_stats()
    assert stats is not None and stats.count == TOKENS
    assert np.isfinite(stats.inputs_std).all() and (stats.inputs_std > 0).mean() > 0.99
