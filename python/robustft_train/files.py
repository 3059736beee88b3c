"""Writing run files atomically: a temporary file in the same folder, fsync, then os.replace, so
a crash leaves the previous file or the new one, never a partial one."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, IO

TMP_PREFIX = ".tmp_"


def atomic_write(path: str, write: Callable[[IO[bytes]], None], suffix: str = ".part") -> None:
    """Call write(f) on a temporary binary file beside `path`, then move it onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
