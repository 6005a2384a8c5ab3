"""A background writer for extraction: the model computes the next batch while the last one is written.

Rows arrive in the store's storage representation; the writer appends them, and folds every completed store chunk
into the norm stats in chunk order. Stats are computed from the stored (rounded) values, chunk by chunk, so an
extraction resumed after a crash (which recomputes the committed chunks' moments from the store) ends with the very
same float64 statistics as an uninterrupted one, equal to `clt norm-stats --workers 1`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import torch

from clt_core.data.layout import from_storage, to_storage
from clt_core.data.norm_stats import NormStatsAccumulator
from clt_core.data.store import StoreWriter


class BackgroundWriter:
    """Appends row blocks through a store writer, from a thread; `put` blocks when `depth` blocks already wait.
    `stats` holds the moments of the whole chunks before the writer's position."""

    def __init__(self, writer: StoreWriter, stats: NormStatsAccumulator, depth: int = 2) -> None:
        store = writer.store
        self.store = store
        self.stats = stats
        self._writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        # Rows not yet folded into the stats: they complete a chunk later.
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        committed = writer.committed
        self._pending_rows = committed % store.rows_per_chunk
        if self._pending_rows:
            inputs, targets, _ = store.read_storage(committed - self._pending_rows, committed, limit=committed)
            self._pending.append((inputs, targets))
        self._thread = threading.Thread(target=self._run, name="clt-extract-writer", daemon=True)
        self._thread.start()

    def put(self, inputs: torch.Tensor, targets: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Queue rows `[n, L, d]` (any float dtype; converted to the store dtype here, in the caller's thread)."""
        self._raise_if_failed()
        dtype = self.store.dtype
        item = (to_storage(inputs, dtype), to_storage(targets, dtype), token_ids.to(torch.int32).numpy())
        while True:
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                self._raise_if_failed()

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                inputs, targets, ids = item
                self._writer.append(inputs, targets, ids)
                self._fold(inputs, targets)
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc
            while self._queue.get() is not None:  # unblock the producer until it notices
                pass

    def _fold(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        """Add rows to the pending block and fold each completed chunk into the stats."""
        rows = self.store.rows_per_chunk
        self._pending.append((inputs, targets))
        self._pending_rows += len(inputs)
        if self._pending_rows < rows:
            return
        block_in = np.concatenate([p[0] for p in self._pending])
        block_tg = np.concatenate([p[1] for p in self._pending])
        full = len(block_in) - len(block_in) % rows
        dtype = self.store.dtype
        for lo in range(0, full, rows):
            self.stats.update(
                from_storage(block_in[lo : lo + rows], dtype), from_storage(block_tg[lo : lo + rows], dtype)
            )
        self._pending = [(block_in[full:].copy(), block_tg[full:].copy())] if full < len(block_in) else []
        self._pending_rows = len(block_in) - full

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write everything queued, commit the tail, and fold the last partial chunk into the stats."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        self._writer.close()
        if self._pending_rows:  # the last, partial chunk: one block, as a separate pass would read it
            dtype = self.store.dtype
            inputs = np.concatenate([p[0] for p in self._pending])
            targets = np.concatenate([p[1] for p in self._pending])
            self.stats.update(from_storage(inputs, dtype), from_storage(targets, dtype))
        self._pending, self._pending_rows = [], 0

    def abort(self) -> None:
        """Stop without committing anything more than what is already committed."""
        self._queue.put(None)
        self._thread.join()
