"""Batches cut from a stream of rows that a background thread produces block by block: what the store's sampler
(blocks: shuffled windows of chunks) and the live source (blocks: shuffled buffers of model activations) share.

The stream's state is one integer, the position of the next batch's first row; a subclass says where a position
falls (`_locate`: which block, and the offset in it) and produces the blocks from there on (`_blocks`, a lazy
iterator: a block is computed only when the background thread asks for it, at most `prefetch` blocks ahead of the
one being consumed and none starting at or past the `read_ahead_until` hint).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from clt_core.data.layout import ActivationRows
from clt_core.errors import CLTError, StoreError


class BlockStream:
    """Iterator of `ActivationRows` batches of `batch_size` consecutive stream rows; see the module docstring.
    Subclasses implement `_locate` and `_blocks` and may override `_end` and `_failure`."""

    def __init__(self, batch_size: int, prefetch: int) -> None:
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.position = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] = queue.Queue()  # holds at most `prefetch` blocks (see _wait_for_room)
        self._room = threading.Condition()
        self._ahead = 0  # blocks the producer has started and the consumer not yet taken
        self._read_until: int | None = None
        self._stop = threading.Event()
        self._current: ActivationRows | None = None
        self._offset = 0

    # ------------------------------------------------------- for subclasses
    def _locate(self, position: int) -> tuple[Any, int]:
        """(where the block holding stream `position` is, for `_blocks`; the row offset of `position` in it)."""
        raise NotImplementedError

    def _blocks(self, where: Any) -> Iterator[ActivationRows]:
        """The blocks from `where` on, in stream order, each computed when asked for."""
        raise NotImplementedError

    def _end(self) -> CLTError:
        """The error for a batch asked for past the end of a finite stream."""
        return StoreError("the stream of training rows has ended")

    def _failure(self, error: BaseException) -> CLTError:
        """The error for an unexpected exception while producing a block."""
        return StoreError(f"producing training rows failed: {error}")

    # ------------------------------------------------------------ producer
    def _produce(self, where: Any, start: int) -> None:
        """Background loop: blocks from `where` (at stream position `start`) on, at most `prefetch` ahead."""
        try:
            blocks = self._blocks(where)
            while self._wait_for_room(start):
                block = next(blocks, None)
                self._queue.put(block)  # None: the end of a finite stream
                if block is None:
                    return
                start += len(block.token_ids)
        except BaseException as exc:  # surfaced in the consumer
            self._queue.put(exc)

    def _wait_for_room(self, start: int) -> bool:
        """Wait until a block starting at stream position `start` may be produced: fewer than `prefetch` are ahead
        of the consumer's, and `start` is before the read-ahead limit. False once the stream is stopping."""
        with self._room:
            while not self._stop.is_set():
                limit = self._read_until
                if self._ahead < self.prefetch and (limit is None or start < limit):
                    self._ahead += 1
                    return True
                self._room.wait(timeout=0.1)
        return False

    # ------------------------------------------------------------ consumer
    def _next_block(self, row: int) -> ActivationRows:
        """The next block of the stream, whose rows the caller needs from stream position `row` on."""
        if self._read_until is not None and row >= self._read_until:
            self.read_ahead_until(None)  # asked past the limit: read on
        item = self._queue.get()
        if item is None or isinstance(item, BaseException):
            self.close()
            if item is None:
                raise self._end()
            if isinstance(item, CLTError):
                raise item
            raise self._failure(item) from item
        with self._room:  # this block is the consumer's now: the producer may start one more
            self._ahead -= 1
            self._room.notify_all()
        return item

    def read_ahead_until(self, position: int | None) -> None:
        """Produce no block ahead that starts at or after stream `position` (None: no limit), e.g. the position after
        a run's last batch. Only a hint: batches past it are still served (produced when asked for)."""
        with self._room:
            self._read_until = position
            self._room.notify_all()

    def __iter__(self) -> Iterator[ActivationRows]:
        return self

    def start(self) -> None:
        """Start the background thread and wait for the first block, so that its errors surface now; `next` does
        this itself when needed."""
        if self._thread is None:
            where, offset = self._locate(self.position)
            self._stop.clear()
            args = (where, self.position - offset)
            self._thread = threading.Thread(target=self._produce, args=args, daemon=True)
            self._thread.start()
            self._current, self._offset = self._next_block(self.position), offset

    def __next__(self) -> ActivationRows:
        self.start()
        pieces: list[ActivationRows] = []
        need = self.batch_size
        while need:
            assert self._current is not None
            available = len(self._current.token_ids) - self._offset
            if available == 0:
                self._current, self._offset = self._next_block(self.position + self.batch_size - need), 0
                continue
            take = min(need, available)
            sl = slice(self._offset, self._offset + take)
            pieces.append(ActivationRows(*(t[sl] for t in self._current)))
            self._offset += take
            need -= take
        self.position += self.batch_size
        if len(pieces) == 1:
            return pieces[0]
        return ActivationRows(*(torch.cat(ts) for ts in zip(*pieces, strict=True)))

    def close(self) -> None:
        """Stop the background thread (the stream can be iterated again afterwards)."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
            self._thread = None
        self._queue = queue.Queue()
        self._ahead = 0
        self._current, self._offset = None, 0

    def __enter__(self) -> BlockStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
