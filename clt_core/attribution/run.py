"""`clt attribute`: circuit-tracer's attribution graph of one prompt for one of our CLTs, run in circuit-tracer's own
virtualenv (it pins transformers 4.57; we run transformers 5), as a subprocess executing `ct_script.py`.

Here, in our environment: the model directory is checked (a native model is exported with `export_circuit_tracer`
into `OUT/transcoders`, reused while the model files are unchanged; an export directory is used as it is), the
language model is found from the `source.json` store record (`smollm2-135m`: the packaged GGUF converted once,
`converted_gguf`), a transformers-4.57-readable view of it is prepared (`circuit_tracer_model_dir`), and the prompt is
tokenised with our tokenizer behind our BOS (the store's `bos_token`, else `DEFAULT_BOS`, else the tokenizer's). The
script then writes the graph files; see docs/attribution.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from clt_core.cache import cache_dir
from clt_core.config import Config
from clt_core.errors import ConfigError, ModelError, first_line

log = logging.getLogger(__name__)

PYTHON_ENV = "CLT_CIRCUIT_TRACER_PYTHON"
"""Environment variable naming circuit-tracer's interpreter (default: the repository's `.venv-circuit-tracer`)."""
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = REPO_ROOT / ".venv-circuit-tracer" / "bin" / "python"
SCRIPT = Path(__file__).with_name("ct_script.py")
SUMMARY_FILE = "attribution.json"
LOG_FILE = "circuit-tracer.log"
EXPORT_SUBDIR = "transcoders"
# HF architectures circuit-tracer 0.5's nnsight backend maps (utils/tl_nnsight_mapping.py).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Files a transformers-4.57 view of a model directory links to unchanged.
_LINKED = ("*.safetensors", "tokenizer.json", "special_tokens_map.json", "generation_config.json", "*.jinja")


class AttributeConfig(Config):
    """What `clt attribute` asks circuit-tracer for."""

    prompt: str = ""
    """The text to attribute (tokenised by our tokenizer behind our BOS)."""
    model: str | None = None
    """Language model (default: the one the CLT's training data came from, from its `source.json`)."""
    bos_token: str | None = None
    """Token put at position 0 (default: the training store's, else `DEFAULT_BOS` of the alias, else the
    tokenizer's BOS)."""
    max_feature_nodes: int | None = Field(7500, ge=1)
    """Most feature nodes in the graph (circuit-tracer's CLI default); null in YAML: all active features."""
    max_n_logits: int = Field(10, ge=1)
    """Most logit nodes."""
    desired_logit_prob: float = Field(0.95, gt=0, le=1)
    """Keep the top logits until their probabilities sum to this."""
    batch_size: int = Field(256, ge=1)
    """Source nodes per backward pass."""
    node_threshold: float = Field(0.8, ge=0, le=1)
    """Pruning for the viewer: keep the nodes with this fraction of the influence."""
    edge_threshold: float = Field(0.98, ge=0, le=1)
    """Pruning for the viewer: keep the edges with this fraction of the influence."""
    slug: str | None = None
    """Name of the graph in the viewer (default: from the prompt)."""
    scan: str | None = None
    """The graph's transcoder id (`scan`) in the viewer (default: the model directory's name, as `clt features`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the replacement model (circuit-tracer casts the transcoders to it; our files stay float32)."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:N."""
    offload: Literal["none", "cpu", "disk"] = "none"
    """circuit-tracer's parameter offloading between phases (saves accelerator memory)."""
    check_features: int = Field(3, ge=0)
    """Top features whose direct effects are checked by intervention (0: none)."""
    save_pt: bool = True
    """Also write `graph.pt` (circuit-tracer's `Graph.to_pt`, a pickle; for its own tools only)."""
    timeout: float = Field(3600, gt=0)
    """Seconds the circuit-tracer process may run."""
    verbose: bool = False
    """circuit-tracer's phase log and progress bar (in `circuit-tracer.log`)."""


@dataclass
class AttributeResult:
    """What `attribute` wrote and measured."""

    out: Path
    summary: dict[str, Any]
    seconds: float
    export_dir: Path
    hf_dir: Path
    token_ids: list[int] = field(default_factory=list)


def circuit_tracer_python() -> Path:
    """circuit-tracer's interpreter: `$CLT_CIRCUIT_TRACER_PYTHON`, else the repository's `.venv-circuit-tracer`."""
    path = Path(os.environ.get(PYTHON_ENV) or DEFAULT_PYTHON).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ConfigError(
            f"circuit-tracer's Python {path} is missing: build it with `make circuit-tracer-venv` "
            f"(or point {PYTHON_ENV} at an interpreter with circuit-tracer 0.5)"
        )
    return path


def attribute(
    model_dir: str | Path, out: str | Path | None, config: AttributeConfig, *, overwrite: bool = False
) -> AttributeResult:
    """Attribute `config.prompt` with the CLT in `model_dir` (native or exported); graph files into `out`
    (default `MODEL_DIR/attribution`). Fails with a one-line `CLTError` on anything the user can fix."""
    started = time.perf_counter()
    if not config.prompt.strip():
        raise ConfigError("--prompt is empty; give the text to attribute")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory not found: {model_dir}")
    kind = model_kind(model_dir)
    python = circuit_tracer_python()
    out = Path(out) if out is not None else model_dir / "attribution"
    slug = config.slug or slugify(config.prompt)
    graph_file = out / "graph" / f"{slug}.json"
    if graph_file.exists() and not overwrite:
        raise ConfigError(f"{graph_file} exists; pass --overwrite to replace it, or give another --slug")
    source = json.loads((model_dir / "source.json").read_text()) if (model_dir / "source.json").is_file() else {}
    store = source.get("store") or {}
    spec = config.model or (store.get("model") or {}).get("name")
    if not spec:
        raise ConfigError(f"{model_dir}: its source.json names no language model; pass --model")
    lm_dir = language_model_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    export_dir = model_dir if kind == "export" else ensure_export(model_dir, out / EXPORT_SUBDIR)
    hf_dir = circuit_tracer_model_dir(lm_dir)
    token_ids = tokenize(lm_dir, config.prompt, bos_token(config, store, spec))

    request = {
        "out": str(out.resolve()),
        "hf_dir": str(hf_dir.resolve()),
        "transcoders": str(export_dir.resolve()),
        "scan": config.scan or model_dir.resolve().name,
        "token_ids": token_ids,
        "slug": slug,
        "dtype": config.dtype,
        "device": config.device,
        "offload": None if config.offload == "none" else config.offload,
        "max_feature_nodes": config.max_feature_nodes,
        "max_n_logits": config.max_n_logits,
        "desired_logit_prob": config.desired_logit_prob,
        "batch_size": config.batch_size,
        "node_threshold": config.node_threshold,
        "edge_threshold": config.edge_threshold,
        "check_features": config.check_features,
        "save_pt": config.save_pt,
        "verbose": config.verbose,
    }
    (out / "request.json").write_text(json.dumps(request, indent=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # our packages must not shadow circuit-tracer's
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    with open(out / LOG_FILE, "w") as logfile:
        try:
            run = subprocess.run(
                [str(python), str(SCRIPT), str(out / "request.json")],
                stdout=logfile, stderr=subprocess.STDOUT, env=env, timeout=config.timeout, cwd=out,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ModelError(f"circuit-tracer ran past --timeout {config.timeout:g} s; see {out / LOG_FILE}") from None
    if run.returncode != 0 or not (out / SUMMARY_FILE).is_file():
        raise ModelError(f"circuit-tracer failed (exit {run.returncode}): {_last_error(out / LOG_FILE)}")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return AttributeResult(out, summary, time.perf_counter() - started, export_dir, hf_dir, token_ids)


def model_kind(model_dir: Path) -> Literal["native", "export"]:
    """`native` (our `config.json` + `model.safetensors`), `export` (circuit-tracer files), else a ConfigError; a
    batchtopk/topk model is refused here, before anything runs."""
    if (model_dir / "config.yaml").is_file() and (model_dir / "W_enc_0.safetensors").is_file():
        return "export"
    if (model_dir / "config.yaml").is_file() and (model_dir / "layer_0.safetensors").is_file():
        return "export"
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir}: neither a model directory (config.json) nor a circuit-tracer export")
    from clt_core.model.directory import read_config

    activation = read_config(model_dir).activation_fn
    if activation in ("batchtopk", "topk"):
        raise ConfigError(
            f"{model_dir} is a {activation} model, which circuit-tracer cannot run (it knows JumpReLU and ReLU); "
            f"convert to JumpReLU first: clt convert {model_dir} --out DIR, then attribute DIR"
        )
    return "native"


def ensure_export(model_dir: Path, export_dir: Path) -> Path:
    """Our circuit-tracer export of `model_dir` in `export_dir`, written again only when the model files changed."""
    from clt_core.export import export_circuit_tracer

    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(model_dir.iterdir()) if f.is_file()}
    stamp_file = export_dir / "exported_from.json"
    record = {"model_dir": str(model_dir.resolve()), "files": stamp}
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == record:
        return export_dir
    export_circuit_tracer(model_dir, export_dir, overwrite=True)
    stamp_file.write_text(json.dumps(record, indent=1))
    return export_dir


def language_model_dir(spec: str) -> Path:
    """A local Hugging Face directory of the language model `spec` (as the store records it): the alias' converted
    GGUF, a directory, a `.gguf` file (converted once), or a hub id already in the hub cache."""
    from clt_core.lm.loading import ALIASES, converted_gguf

    if spec.lower() in ALIASES:
        return converted_gguf(ALIASES[spec.lower()](), spec.lower())[0]
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return converted_gguf(path, path.stem.lower())[0]
    if path.is_absolute() or path.exists():
        raise ModelError(f"language model {spec} is not a Hugging Face directory or .gguf file; pass --model DIR")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    from clt_core.lm.loading import HUB_PATTERNS

    try:
        return Path(snapshot_download(spec, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise ModelError(
            f"language model {spec!r} is not in the Hugging Face cache (attribution runs offline); "
            "download it or pass --model DIR"
        ) from None


def circuit_tracer_model_dir(lm_dir: Path) -> Path:
    """A view of `lm_dir` that transformers 4.57 reads as the same model, in the cache (links to the weights).

    transformers 5 writes RoPE as `rope_parameters` and the tokenizer class as `TokenizersBackend`; 4.57 would take
    the default `rope_theta` (10,000; SmolLM2 uses 100,000) and not know the class. The view has `rope_theta` /
    `rope_scaling`, `torch_dtype` and `PreTrainedTokenizerFast`. Refuses architectures circuit-tracer's nnsight
    backend does not map, and a model whose LM head is neither tied nor stored."""
    config = json.loads((lm_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{lm_dir}: architectures {architectures} is not one circuit-tracer's nnsight backend maps "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tied = bool(config.get("tie_word_embeddings", True))
    if not tied and "lm_head.weight" not in _weight_names(lm_dir):
        raise ModelError(f"{lm_dir}: tie_word_embeddings is false but the weights hold no lm_head.weight")
    config = _config_for_transformers_4(config)
    tok_config = _tokenizer_config_for_transformers_4(lm_dir)
    digest = hashlib.sha256(
        json.dumps([str(lm_dir.resolve()), config, tok_config], sort_keys=True).encode()
    ).hexdigest()[:12]
    target = cache_dir() / "circuit-tracer-models" / f"{lm_dir.name}-{digest}"
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for pattern in _LINKED:
            for f in lm_dir.glob(pattern):
                (tmp / f.name).symlink_to(f.resolve())
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the view complete
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _config_for_transformers_4(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    rope = config.pop("rope_parameters", None)
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config.pop("dtype")
    return config


def _tokenizer_config_for_transformers_4(lm_dir: Path) -> dict[str, Any]:
    file = lm_dir / "tokenizer_config.json"
    tok = json.loads(file.read_text()) if file.is_file() else {}
    if not (lm_dir / "tokenizer.json").is_file():
        raise ModelError(f"{lm_dir}: no tokenizer.json (circuit-tracer's transformers 4.57 reads the fast tokenizer)")
    if tok.get("tokenizer_class") in (None, "TokenizersBackend"):
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only"):
        tok.pop(key, None)
    return tok


def _weight_names(lm_dir: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in lm_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            names.update(fh.keys())
    return names


def bos_token(config: AttributeConfig, store: dict[str, Any], spec: str) -> str | None:
    """The token at position 0: --bos-token, else the training store's, else `DEFAULT_BOS` (None: the tokenizer's)."""
    from clt_core.extract.extractor import DEFAULT_BOS

    if config.bos_token:
        return config.bos_token
    text = (store.get("extraction") or {}).get("text") or {}
    return text.get("bos_token") or DEFAULT_BOS.get(spec.lower())


def tokenize(lm_dir: Path, prompt: str, bos: str | None) -> list[int]:
    """`[BOS] + ids of prompt`, as extraction packs windows (no special tokens added, special text not parsed)."""
    from transformers import AutoTokenizer

    from clt_core.lm.windows import _bos_id

    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    ids = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [_bos_id(tokenizer, bos), *map(int, ids)]


def slugify(prompt: str) -> str:
    """A viewer slug from the prompt: lower-case words joined by '-', at most 40 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-")
    return slug or "graph"


def _last_error(log_file: Path) -> str:
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        return f"no output; see {log_file}"
    return f"{first_line(Exception(lines[-1]), limit=300)} (full log: {log_file})"


def describe(result: AttributeResult) -> str:
    """A few lines for the terminal: nodes, top logits, checks, timing."""
    s = result.summary
    checks = s.get("checks", {})
    lines = [
        f"attributed {len(s['token_ids'])} tokens: {s['active_features']} active features, "
        f"{s['selected_features']} in the graph, {len(s['logit_targets'])} logits",
        "top logits: " + ", ".join(f"{t['token']!r} {t['probability']:.3f}" for t in s["logit_targets"][:5]),
    ]
    rep, comp = checks.get("replacement", {}), checks.get("completeness", {})
    if "max_abs_logit_diff" in rep:
        lines.append(f"replacement model with errors vs the model's logits: max |diff| {rep['max_abs_logit_diff']:.2e}")
    if "max_abs_residual" in comp:
        lines.append(f"logit rows sum to the demeaned logits: max |residual| {comp['max_abs_residual']:.2e}")
    for name, check in checks.items():
        if "error" in check:
            lines.append(f"check {name} could not run: {check['error']}")
    t = s.get("timings", {})
    lines.append(
        f"{result.seconds:.1f} s in all (load {t.get('load_s', 0):.1f} s, attribute {t.get('attribute_s', 0):.1f} s)"
        f"; viewer files in {result.out / 'graph'}"
    )
    return "\n".join(lines)
