"""Writing run files atomically: a temporary file in the same folder, fsync, os.replace, then
fsync of the folder, so a crash (or a power cut) leaves the previous file or the new one, never a
partial one or none."""
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
        fsync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_folder(folder: str) -> None:
    """Make a rename or deletion in `folder` durable: the folder's own entry list is flushed only
    by an fsync of the folder (POSIX; Windows cannot open a folder, and needs none)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str, *, if_changed: bool = False) -> None:
    """Write `text` to `path` atomically; with if_changed, leave a file that already holds it alone."""
    data = text.encode("utf-8")
    if if_changed and os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    atomic_write(path, lambda f: f.write(data))
