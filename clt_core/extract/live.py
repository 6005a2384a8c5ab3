"""The live source: training batches computed by the language model while training runs; no store is written.

The corpus is packed into windows exactly as extraction packs it (`clt_core.lm.windows`), so a live run and an
extract-then-train run see the same token rows. Kept rows `[0, held_out_tokens)` are the held-out rows (training
extracts them once into a small store for evaluation); the `tokens` rows after them are the training rows.

The stream of training rows, deterministic in `seed`: the training windows, in corpus order, are cut into *spans*
of `shuffle_windows` windows and each span's order is permuted (seeded with `(seed, span)`), so consecutive forward
passes read windows from all over a span; the permuted windows are cut into *buffers* of about `shuffle_rows` rows
(`buffer_windows` windows); each buffer's rows, computed by the model, are permuted (seeded with `(seed, buffer)`)
and appended to the stream. Batch `b` is rows `[b·B, (b+1)·B)`. A background thread computes the next buffer while
training consumes the current one (at most `prefetch_buffers` ahead).

Normalisation statistics come from the first buffer (the warm-up sample), computed before the first step; the
trainer records them in every checkpoint and model directory, and a resumed run takes them from its checkpoint.
The state is the stream position (and the rows each buffer lost to `nonfinite: skip`): a resumed run re-derives
the window order, recomputes the buffer it stopped in (a deterministic refill: the same forward passes on the same
windows) and continues bit-exactly.

Feature-parallel ranks (torchrun) share the language model's work: rank r runs forward batches r, r + world size, …
of a buffer, and each round's rows are all-gathered over a process group of their own, so every rank trains on the
same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field

from clt_core.data.layout import ActivationRows, default_rows_per_chunk
from clt_core.data.norm_stats import NormStatsAccumulator
from clt_core.data.sampler import OUTPUT_DTYPES, Normalizer, SamplerConfig, place_rows
from clt_core.data.stream import BlockStream
from clt_core.errors import ConfigError, StoreError
from clt_core.extract.extractor import (
    COMPUTE_DTYPES,
    DEFAULT_BOS,
    ExtractConfig,
    LanguageModelConfig,
    lm_provenance,
)
from clt_core.lm.capture import CapturePoints, NNsightCapture, capture_points
from clt_core.lm.corpora import TextConfig, source_name
from clt_core.lm.loading import LoadedModel, resolve_model
from clt_core.lm.windows import PackedWindow, batched_windows, corpus_rows, iter_windows, rows_between

STATE_VERSION = 1


class LiveConfig(LanguageModelConfig):
    """Train straight from a language model (`clt train --model M --text T --tokens N`): the model, text and packing
    as for extraction, and how its rows are streamed."""

    tokens: int = Field(1_000_000, ge=1)
    """Training token rows; the run trains ⌊tokens / sampler.batch_size⌋ steps, each row once."""
    forward_batch: int = Field(8, ge=1)
    """Windows per forward pass of the language model."""
    shuffle_rows: int = Field(16384, ge=1)
    """Rows mixed together (the mixing buffer): each batch draws from about this many rows; memory is
    `(prefetch_buffers + 2)` buffers (computed ahead, being filled, being trained on) of `shuffle_rows · L · d · 2`
    values."""
    shuffle_windows: int = Field(4096, ge=1)
    """Windows whose order is permuted together (cheap: token ids only), so a buffer mixes windows from this span."""
    prefetch_buffers: int = Field(1, ge=1)
    """Buffers computed ahead of the one being trained on."""
    held_out_tokens: int = Field(16384, ge=0)
    """Rows before the training rows held out for evaluation (extracted once into `OUT/held_out`); 0: none."""

    def held_out_config(self, num_layers: int, d_model: int) -> ExtractConfig:
        """The extraction of the held-out rows (the corpus's first `held_out_tokens`) by this model, in chunks of at
        most an eighth of them, so that conversion and evaluation can split them (`holdout_fraction`)."""
        rows = self.held_out_tokens
        chunk = min(default_rows_per_chunk(num_layers, d_model, "bfloat16"), 2 ** max(4, (rows // 8).bit_length() - 1))
        return self.extract_config(rows).model_copy(update={"chunk_rows": chunk})

    def extract_config(self, tokens: int) -> ExtractConfig:
        """The extraction of the first `tokens` rows of this corpus with this model."""
        return ExtractConfig(
            model=self.model,
            text=self.text,
            tokens=tokens,
            context_size=self.context_size,
            batch_size=self.forward_batch,
            compute_dtype=self.compute_dtype,
            input_template=self.input_template,
            output_template=self.output_template,
        )

    def packed_text(self) -> TextConfig:
        """`text` with the BOS extraction uses for this model (SmolLM2's documents start with `<|endoftext|>`)."""
        text = self.text
        if text.bos_token is None and text.add_bos and self.model.lower() in DEFAULT_BOS:
            text = text.model_copy(update={"bos_token": DEFAULT_BOS[self.model.lower()]})
        return text


@dataclass(frozen=True)
class _Buffer:
    index: int
    windows: tuple[PackedWindow, ...]

    @property
    def rows(self) -> int:
        return sum(int(w.keep.sum()) for w in self.windows)


class LiveSource(BlockStream):
    """Iterator of shuffled `ActivationRows` batches computed by the language model, until its `tokens` are used;
    the interface of `ActivationSampler` (`start`, `next`, `state_dict`, `load_state_dict`, `read_ahead_until`,
    `close`, `normalizer`). See the module docstring."""

    def __init__(
        self,
        config: LiveConfig,
        sampler: SamplerConfig,
        *,
        device: str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        group: Any = None,
        progress: bool = True,
    ) -> None:
        super().__init__(sampler.batch_size, config.prefetch_buffers)
        self.config, self.sampler = config, sampler
        self.rank, self.world_size, self.group = rank, world_size, group
        self.device = device
        self.loaded: LoadedModel = resolve_model(
            config.model, dtype=COMPUTE_DTYPES[config.compute_dtype], device=device, progress=progress
        )
        loaded = self.loaded
        if loaded.max_context is not None and config.context_size > loaded.max_context:
            raise ConfigError(
                f"context_size {config.context_size} is larger than {loaded.name}'s maximum of {loaded.max_context}"
            )
        self.points: CapturePoints = capture_points(loaded.model, config.input_template, config.output_template)
        self.text = config.packed_text()
        need = config.held_out_tokens + config.tokens
        available = corpus_rows(self.text, loaded.tokenizer, config.context_size, limit=need)
        if available.rows < need:
            raise ConfigError(
                f"--tokens {config.tokens:,} (+ {config.held_out_tokens:,} held out) is more than the corpus "
                f"{source_name(self.text)!r} holds at context size {config.context_size}: {available.rows:,} rows; "
                "lower --tokens or add text"
            )
        self.num_layers, self.d_model = loaded.num_layers, loaded.d_model
        # `store`: what a store extracted by default holds (bf16), so that a live run trains on the very values an
        # extract-then-train run does
        self.dtype = torch.bfloat16 if sampler.dtype == "store" else OUTPUT_DTYPES[sampler.dtype]
        self.normalizer: Normalizer | None = None
        self._capture = NNsightCapture(loaded.model, self.points)
        text_rows = config.context_size - int(self.text.add_bos)
        self.buffer_windows = max(1, math.ceil(config.shuffle_rows / text_rows))
        self._skipped: dict[int, int] = {}  # buffer -> rows left out for NaN/Inf (`nonfinite: skip`)

    @property
    def url(self) -> str:
        """What errors name as the data."""
        return f"live:{self.config.model}"

    def store_info(self) -> dict[str, Any]:
        """What a store extracted by this model would record about its origin (for a run without held-out rows)."""
        return {
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "dtype": self.config.compute_dtype,
            **lm_provenance(self.loaded, self.points, self.config.context_size, self.text),
        }

    def model_bytes(self) -> int:
        """Memory of the language model: its weights, and one forward pass's captured activations (twice: the
        capture and its kept rows)."""
        weights = sum(p.numel() * p.element_size() for p in self.loaded.model.parameters())
        itemsize = COMPUTE_DTYPES[self.config.compute_dtype].itemsize
        batch = self.config.forward_batch * self.config.context_size * self.num_layers * self.d_model * itemsize
        return weights + 4 * batch

    # ------------------------------------------------------------ the stream
    def _windows(self) -> Iterator[PackedWindow]:
        """The training windows in stream order: spans of `shuffle_windows` windows, each permuted."""
        config = self.config
        first, stop = config.held_out_tokens, config.held_out_tokens + config.tokens
        windows = rows_between(iter_windows(self.text, self.loaded.tokenizer, config.context_size), first, stop)
        for span, group in enumerate(batched_windows(windows, config.shuffle_windows)):
            order = np.random.default_rng([self.sampler.seed, 0, span]).permutation(len(group))
            yield from (group[i] for i in order)

    def _buffers(self) -> Iterator[_Buffer]:
        for index, group in enumerate(batched_windows(self._windows(), self.buffer_windows)):
            yield _Buffer(index, tuple(group))

    def _locate(self, position: int) -> tuple[int, int]:
        """(buffer index, row offset in it) of a stream position."""
        for buffer in self._buffers():
            rows = buffer.rows - self._skipped.get(buffer.index, 0)
            if position < rows:
                return buffer.index, position
            position -= rows
        raise StoreError(f"{self.url}: stream position past the {self.config.tokens:,} training rows")

    def _forward(self, batch: list[PackedWindow]) -> ActivationRows:
        """The kept rows of one forward pass over `batch`, inputs and targets in the compute dtype."""
        ids = torch.from_numpy(np.stack([w.token_ids for w in batch])).to(self.device)
        keep = torch.from_numpy(np.stack([w.keep for w in batch])).to(self.device)
        inputs, targets = self._capture(ids)
        return ActivationRows(inputs[keep].cpu(), targets[keep].cpu(), ids[keep].to(torch.int32).cpu())

    def _batch_rows(self, batches: list[list[PackedWindow]]) -> Iterator[tuple[int, ActivationRows]]:
        """(batch index, its rows) for every forward batch of a buffer. With several ranks, rank r computes batches
        r, r + world_size, ... and each round's rows are all-gathered, so every rank gets every batch."""
        if self.world_size == 1:
            for b, batch in enumerate(batches):
                yield b, self._forward(batch)
            return
        import torch.distributed as dist

        for first in range(0, len(batches), self.world_size):
            members = list(range(first, min(first + self.world_size, len(batches))))
            counts = [sum(int(w.keep.sum()) for w in batches[b]) for b in members]
            mine = first + self.rank
            part = self._forward(batches[mine]) if mine in members else None
            gathered: list[list[torch.Tensor]] = []
            for i in range(3):
                like = (torch.empty(0, self.num_layers, self.d_model) if i < 2 else torch.empty(0)).to(
                    COMPUTE_DTYPES[self.config.compute_dtype] if i < 2 else torch.int32
                )
                local = part[i] if part is not None else like
                padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype)
                padded[: len(local)] = local
                out = [torch.empty_like(padded) for _ in range(self.world_size)]
                dist.all_gather(out, padded, group=self.group)
                gathered.append(out)
            for j, b in enumerate(members):
                yield b, ActivationRows(*(gathered[i][j][: counts[j]] for i in range(3)))

    def _place(self, rows: ActivationRows, out: ActivationRows, dest: torch.Tensor, bad: torch.Tensor) -> None:
        """Rows into `out` at positions `dest`, normalised with `self.normalizer` (raw while it is unknown) and
        converted, NaN/Inf rows flagged in `bad`; values rounded to the batches' dtype first, as a store of that
        dtype holds them."""
        if self.dtype.itemsize < rows.inputs.dtype.itemsize:
            rows = ActivationRows(rows.inputs.to(self.dtype), rows.targets.to(self.dtype), rows.token_ids)
        place_rows(rows, self.normalizer, out, dest, bad)

    def _normalise_in_place(self, out: ActivationRows, block: int = 1024) -> None:
        """The warm-up buffer, placed raw, normalised a block of rows at a time (bounded temporaries)."""
        for lo in range(0, len(out.token_ids), block):
            hi = min(lo + block, len(out.token_ids))
            raw = ActivationRows(*(t[lo:hi].clone() for t in out))
            self._place(raw, out, torch.arange(lo, hi), torch.zeros(hi - lo, dtype=torch.bool))

    def _fill(self, buffer: _Buffer) -> ActivationRows:
        """A buffer's rows computed a forward batch at a time, each placed straight at its permuted positions,
        normalised and converted (the warm-up buffer's after its moments set the normaliser); rows holding NaN/Inf
        dropped (`skip`) or refused (`error`)."""
        batches = list(batched_windows(list(buffer.windows), self.config.forward_batch))
        counts = [sum(int(w.keep.sum()) for w in batch) for batch in batches]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        n = int(starts[-1])
        positions = torch.from_numpy(np.random.default_rng([self.sampler.seed, 1, buffer.index]).permutation(n))
        shape = (n, self.num_layers, self.d_model)
        out = ActivationRows(
            torch.empty(shape, dtype=self.dtype),
            torch.empty(shape, dtype=self.dtype),
            torch.empty(n, dtype=torch.int32),
        )
        bad = torch.zeros(n, dtype=torch.bool)  # in window order
        warm_up = self.normalizer is None and self.sampler.normalization_method != "none"
        stats = NormStatsAccumulator(self.num_layers, self.d_model) if warm_up else None
        for b, rows in self._batch_rows(batches):
            lo, hi = starts[b], starts[b + 1]
            if stats is not None:  # of the values a store would hold
                stats.update(rows.inputs.to(self.dtype), rows.targets.to(self.dtype))
            self._place(rows, out, positions[lo:hi], bad[lo:hi])
        if stats is not None:
            self.normalizer = Normalizer.from_stats(stats.result())
            self._normalise_in_place(out)
        if bad.any():
            if self.sampler.nonfinite == "error":
                raise StoreError(
                    f"{self.url}: {int(bad.sum())} row(s) of training buffer {buffer.index} hold NaN/Inf (the model's "
                    "activations overflow?); set sampler.nonfinite: skip (--nonfinite skip) to train without them, "
                    "or run the model in float32 (--compute-dtype float32)"
                )
            keep = torch.ones(n, dtype=torch.bool)
            keep[positions[bad]] = False
            self._skipped[buffer.index] = int(bad.sum())
            out = ActivationRows(*(t[keep] for t in out))
        return out

    def _blocks(self, where: int) -> Iterator[ActivationRows]:
        return (self._fill(buffer) for buffer in self._buffers() if buffer.index >= where)

    def _end(self) -> StoreError:
        return StoreError(f"{self.url}: all {self.config.tokens:,} training rows are used; raise --tokens")

    def _failure(self, error: BaseException) -> StoreError:
        return StoreError(f"{self.url}: computing a training buffer failed: {error}")

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The stream position plus what the stream depends on."""
        return {
            "version": STATE_VERSION,
            "kind": "live",
            "position": self.position,
            "seed": self.sampler.seed,
            "batch_size": self.sampler.batch_size,
            "buffer_windows": self.buffer_windows,
            "shuffle_windows": self.config.shuffle_windows,
            "world_size": self.world_size,
            **({"nonfinite_skipped": {str(b): n for b, n in sorted(self._skipped.items())}} if self._skipped else {}),
        }

    def load_state_dict(self, state: dict[str, Any], normalizer: Normalizer | None = None) -> None:
        """Continue at a saved state; `normalizer`: the run's (from its checkpoint), so no warm-up is recomputed."""
        expected = self.state_dict()
        for key in ("version", "kind", "seed", "buffer_windows", "shuffle_windows", "world_size"):
            if state.get(key) != expected[key]:
                raise StoreError(
                    f"live-source state was saved with {key}={state.get(key)!r} but this run has "
                    f"{key}={expected[key]!r}; resume with the same settings"
                )
        self.close()
        self.position = int(state["position"])
        self._skipped = {int(b): int(n) for b, n in state.get("nonfinite_skipped", {}).items()}
        if normalizer is not None or self.sampler.normalization_method == "none":
            self.normalizer = normalizer
