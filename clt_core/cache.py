"""The one local cache of clt-pipeline: converted models, weight hashes, downloaded corpora."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$CLT_CACHE_DIR`, else `$XDG_CACHE_HOME/clt-pipeline` (by default ~/.cache/clt-pipeline)."""
    if os.environ.get("CLT_CACHE_DIR"):
        return Path(os.environ["CLT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "clt-pipeline"
