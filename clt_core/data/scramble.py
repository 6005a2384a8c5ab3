"""Out-of-core global shuffle of an activation store into a new store (stub: being implemented)."""

from __future__ import annotations

from pydantic import ByteSize, Field

from clt_core.config import Config


class ScrambleConfig(Config):
    """How to scramble a store."""

    seed: int = 0
    """Seed of the permutation: the same seed gives the same output store."""
    memory_budget: ByteSize = ByteSize(2 * 10**9)
    """Peak memory to use, e.g. 2GB or 512MiB."""
    workers: int = Field(4, ge=1, le=64)
    """Parallel chunk reads and writes."""
    tmp_dir: str | None = None
    """Local directory for the spill files (default: the system temp directory)."""
    rows_per_chunk: int | None = Field(None, ge=1)
    """Rows per chunk of the output store (default: as the source)."""
