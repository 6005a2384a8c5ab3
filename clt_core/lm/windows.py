"""Token windows: documents tokenised and packed into context windows without padding, row budgets, batches.

Packing (`pack_windows`): documents are tokenised in blocks (never the whole corpus at once), joined with the separator
between consecutive documents, and the stream is cut into consecutive windows of exactly `context_size` tokens; with
`add_bos` each window is BOS followed by `context_size - 1` stream tokens. The last, incomplete window is dropped. Every
window carries a `keep` mask: positions whose activations become store rows (never the BOS position; by default not
special tokens such as an EOS separator either). Text that spells a special token (`<|endoftext|>` in a web page) is
tokenised as ordinary text, so the only special tokens in a window are the ones packing inserts.

Row budgets, shards and resume compose on the window stream: `rows_between(pack_windows(...), start, stop)` gives
exactly the kept rows [start, stop) of the stream, at row granularity: `limit_rows` caps the stream at `stop` rows (the
last window keeps only what is needed) and `skip_rows` drops the first `start` (a shard's start plus what it already
committed, when resuming). `count_rows` tells how many rows a corpus holds. `batched_windows` groups windows into
the batches of one forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from clt_core.errors import ConfigError
from clt_core.lm.corpora import TextConfig, iter_documents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True, slots=True)  # not a NamedTuple: its field `index` would hide tuple.index
class PackedWindow:
    """One context window: exactly `context_size` tokens, no padding."""

    token_ids: np.ndarray
    """int64 `[context_size]`."""
    keep: np.ndarray
    """bool `[context_size]`: positions whose activations become store rows."""
    index: int
    """Window number in the whole corpus stream (0-based), the same whatever the shard or resume point."""


class CorpusCount(NamedTuple):
    """What `count_rows` found."""

    windows: int
    """Windows read (the one reaching `limit` included)."""
    rows: int
    """Kept rows in them, at most `limit`."""
    exhausted: bool
    """True when the corpus ended before reaching `limit` (always, without a limit)."""


# ---------------------------------------------------------------------------------------------------------------------
# Packing


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Every id the tokenizer treats as special, added special tokens included (sorted int64)."""
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return np.array(sorted(i for i in ids if i is not None), dtype=np.int64)


def separator_ids(tokenizer: PreTrainedTokenizerBase, separator: str | Sequence[int] | None) -> np.ndarray:
    """Token ids of the separator; a special token's text (`<|endoftext|>`) gives that special token."""
    if separator is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(separator, str):
        ids = tokenizer(separator, add_special_tokens=False, split_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)
    return np.asarray(list(separator), dtype=np.int64)


def _document_blocks(documents: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    block: list[str] = []
    chars = 0
    for doc in documents:
        block.append(doc)
        chars += len(doc)
        if len(block) >= max_docs or chars >= max_chars:
            yield block
            block, chars = [], 0
    if block:
        yield block


def pack_windows(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    *,
    add_bos: bool,
    bos_token: str | None = None,
    separator: str | Sequence[int] | None = "\n\n",
    exclude_special: bool = True,
    start: int = 0,
    block_documents: int = 256,
    block_chars: int = 1 << 20,
) -> Iterator[PackedWindow]:
    """Consecutive windows of exactly `context_size` tokens over the separator-joined document stream.

    Documents are tokenised `block_documents` (or `block_chars` characters) at a time, so memory stays bounded by a
    block plus one window whatever the corpus size. Windows before `start` are not built (resume, sharding); the
    tokeniser still has to read the text before them, since window boundaries depend on every token.
    """
    n_text = context_size - int(add_bos)
    if n_text < 1:
        raise ConfigError(f"context size {context_size} leaves no room for text tokens")
    bos = _bos_id(tokenizer, bos_token) if add_bos else None
    special = special_token_ids(tokenizer) if exclude_special else np.zeros(0, dtype=np.int64)
    sep = separator_ids(tokenizer, separator)
    blocks = _document_blocks(documents, block_documents, block_chars)
    return _packed(blocks, tokenizer, n_text, bos, sep, special, start)  # arguments checked above, at call time


def _packed(
    blocks: Iterator[list[str]],
    tokenizer: PreTrainedTokenizerBase,
    n_text: int,
    bos: int | None,
    sep: np.ndarray,
    special: np.ndarray,
    start: int,
) -> Iterator[PackedWindow]:
    pending: list[np.ndarray] = []
    pending_len = 0
    index = 0
    first = True
    for block in blocks:
        encoded = tokenizer(
            block,
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
            verbose=False,
        )["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            if not first and sep.size:
                pending.append(sep)
                pending_len += sep.size
            pending.append(np.asarray(ids, dtype=np.int64))
            pending_len += len(ids)
            first = False
        if pending_len < n_text:
            continue
        stream = np.concatenate(pending)
        count = len(stream) // n_text
        for k in range(count):
            if index >= start:
                yield _make_window(stream[k * n_text : (k + 1) * n_text], bos, special, index)
            index += 1
        rest = stream[count * n_text :].copy()  # copy: do not pin the whole block's stream
        pending, pending_len = [rest], len(rest)


def _bos_id(tokenizer: PreTrainedTokenizerBase, bos_token: str | None) -> int:
    if bos_token is None:
        if tokenizer.bos_token_id is None:
            raise ConfigError("the tokenizer has no BOS token; set bos_token, or add_bos: false")
        return int(tokenizer.bos_token_id)
    # A vocabulary lookup: tokenising the text of a special token may split it.
    token_id = tokenizer.convert_tokens_to_ids(bos_token)
    if not isinstance(token_id, int | np.integer) or (
        token_id == tokenizer.unk_token_id and bos_token != tokenizer.unk_token
    ):  # None: not in the vocabulary
        raise ConfigError(f"bos_token {bos_token!r} is not a single token of this tokenizer")
    return int(token_id)


def _make_window(text_ids: np.ndarray, bos: int | None, special: np.ndarray, index: int) -> PackedWindow:
    """`special`: the ids whose positions are not kept (empty when special tokens are kept)."""
    if bos is None:
        token_ids = text_ids.copy()
    else:
        token_ids = np.empty(len(text_ids) + 1, dtype=np.int64)
        token_ids[0] = bos
        token_ids[1:] = text_ids
    keep = ~np.isin(token_ids, special) if special.size else np.ones(len(token_ids), dtype=bool)
    if bos is not None:
        keep[0] = False
    return PackedWindow(token_ids, keep, index)


def iter_windows(
    config: TextConfig, tokenizer: PreTrainedTokenizerBase, context_size: int, *, start: int = 0
) -> Iterator[PackedWindow]:
    """`pack_windows` over the configured corpus with the configured separator, BOS and special-token handling."""
    return pack_windows(
        iter_documents(config),
        tokenizer,
        context_size,
        add_bos=config.add_bos,
        bos_token=config.bos_token,
        separator=config.document_separator,
        exclude_special=config.exclude_special,
        start=start,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Row budgets, shards, resume


def limit_rows(windows: Iterable[PackedWindow], rows: int) -> Iterator[PackedWindow]:
    """Windows up to exactly `rows` kept positions: the last one keeps only its first ones that fit (the model still
    sees the whole window). Ends early, without error, if the corpus is shorter (check with `count_rows`)."""
    left = rows
    for window in windows:
        if left <= 0:
            return
        kept = int(window.keep.sum())
        if kept > left:
            window = dataclasses.replace(window, keep=_keep_first(window.keep, left))
            kept = left
        left -= kept
        yield window


def skip_rows(windows: Iterable[PackedWindow], rows: int) -> Iterator[PackedWindow]:
    """Drop the first `rows` kept positions (those already committed, when resuming): whole windows first, then the
    first kept positions of the window where the committed rows end."""
    left = rows
    for window in windows:
        if left > 0:
            kept = int(window.keep.sum())
            if kept <= left:
                left -= kept
                continue
            window = dataclasses.replace(window, keep=window.keep & ~_keep_first(window.keep, left))
            left = 0
        yield window


def _keep_first(keep: np.ndarray, n: int) -> np.ndarray:
    """The mask of the first `n` True positions of `keep`."""
    out = keep.copy()
    out[np.flatnonzero(keep)[n:]] = False
    return out


def rows_between(windows: Iterable[PackedWindow], start: int, stop: int) -> Iterator[PackedWindow]:
    """The windows holding kept rows [start, stop) of the stream, their `keep` masks cut to exactly those rows."""
    return skip_rows(limit_rows(windows, stop), start)


def count_rows(windows: Iterable[PackedWindow], *, limit: int | None = None) -> CorpusCount:
    """How many rows the windows hold, stopping at `limit`."""
    total = 0
    count = 0
    if limit is not None and limit <= 0:
        return CorpusCount(0, 0, False)
    for window in windows:
        kept = int(window.keep.sum())
        if limit is not None:
            kept = min(kept, limit - total)
        total += kept
        count += 1
        if limit is not None and total >= limit:
            return CorpusCount(count, total, False)
    return CorpusCount(count, total, True)


def corpus_rows(
    config: TextConfig,
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    *,
    limit: int | None = None,
) -> CorpusCount:
    """Rows the configured corpus yields at this context size. With `limit` (the `--tokens` asked for) it reads only
    as far as needed, so checking that the corpus is big enough costs a full pass only when it is not."""
    return count_rows(iter_windows(config, tokenizer, context_size), limit=limit)


# ---------------------------------------------------------------------------------------------------------------------
# Batches


def batched_windows(windows: Iterable[PackedWindow], size: int) -> Iterator[list[PackedWindow]]:
    """Consecutive lists of `size` windows (the last one shorter): the batches of one forward pass each."""
    batch: list[PackedWindow] = []
    for window in windows:
        batch.append(window)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
