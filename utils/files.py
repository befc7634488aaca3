"""Files written whole or not at all."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same folder, same suffix) to write to; when the block
    ends without an error, rename it onto ``path`` (atomic on one filesystem: a reader sees the old
    file or the new one, never half of one). On an error or Ctrl-C the temporary file is removed and
    the previous ``path``, if any, is left intact. The parent folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
