"""A background writer for extraction: the model computes the next batch while the last one is written.

Rows arrive in the logical dtype's storage representation (bf16 as uint16 bits); the writer thread encodes them as
the store stores them (quantising them in a quantised store), appends them, and folds every completed store chunk
into the norm stats in chunk order. Stats are computed from the stored values as every reader reads them (rounded,
and dequantised), chunk by chunk, so an extraction resumed after a crash (which recomputes the committed chunks'
moments from the store) ends with the very same float64 statistics as an uninterrupted one, equal to
`clt norm-stats --workers 1`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from clt_core.data.layout import RawRows, to_storage
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
        # Rows not yet folded into the stats, as stored: they complete a chunk later.
        self._pending: list[RawRows] = []
        committed = writer.committed
        self._pending_rows = committed % store.rows_per_chunk
        if self._pending_rows:
            self._pending.append(store.read_raw(committed - self._pending_rows, committed, limit=committed))
        self._thread = threading.Thread(target=self._run, name="clt-extract-writer", daemon=True)
        self._thread.start()

    def put(self, inputs: torch.Tensor, targets: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Queue rows `[n, L, d]` (any float dtype; converted to the logical dtype here, in the caller's thread, and
        quantised, for a quantised store, in the writer's)."""
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
                raw = self.store.encode(*item)
                self._writer.append_raw(raw)
                self._fold(raw)
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc
            while self._queue.get() is not None:  # unblock the producer until it notices
                pass

    def _fold(self, raw: RawRows) -> None:
        """Add rows to the pending block and fold each completed chunk into the stats."""
        rows = self.store.rows_per_chunk
        self._pending.append(raw)
        self._pending_rows += raw.num_rows
        if self._pending_rows < rows:
            return
        block = RawRows.concat(self._pending)
        full = block.num_rows - block.num_rows % rows
        for lo in range(0, full, rows):
            chunk = self.store.decode(block.rows(lo, lo + rows))
            self.stats.update(chunk.inputs, chunk.targets)
        self._pending = [block.rows(full, block.num_rows).copy()] if full < block.num_rows else []
        self._pending_rows = block.num_rows - full

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
            chunk = self.store.decode(RawRows.concat(self._pending))
            self.stats.update(chunk.inputs, chunk.targets)
        self._pending, self._pending_rows = [], 0

    def abort(self) -> None:
        """Stop without committing anything more than what is already committed."""
        self._queue.put(None)
        self._thread.join()
