"""Writing files so that a crash, a full disk or a concurrent builder never leaves a half-written one."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path

from qwen_image_trt.core.errors import QitrtError

HASH_CHUNK = 1 << 22


def file_sha256(path: str | os.PathLike, chunk: int = HASH_CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def temporary_name(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is renamed into place (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write via a temporary file and rename: a crash never leaves half a manifest, engine or result."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else memoryview(data))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, path) from e
    return path


def disk_error(error: OSError, path) -> Exception:
    """A full disk becomes an error that says where and how much room is left; other OSErrors pass."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return error
    folder = Path(path).parent
    free = shutil.disk_usage(folder if folder.exists() else Path.cwd()).free
    return QitrtError(f"disk full while writing {path} ({free / 1e9:.1f} GB free in {folder}); nothing half-written "
                      "was kept: free space (or pick another --out) and run the command again")


class HashingWriter:
    """A binary file written front to back whose sha256 and size are known when it closes.

    Written under a temporary name and renamed by `commit()`; `abort()` (or leaving the `with` block on an
    exception) removes it, so no later run can take a truncated file for a finished one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self._fh = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            self._fh.write(view)
        except OSError as e:
            self.abort()
            raise disk_error(e, self.path) from e
        self._sha.update(view)
        self.size += len(view)
        return len(view)

    def pad_to(self, alignment: int) -> int:
        """Zero-pad so the next write starts at a multiple of `alignment`; return that offset."""
        if self.size % alignment:
            self.write(bytes(alignment - self.size % alignment))
        return self.size

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def commit(self) -> Path:
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise disk_error(e, self.path) from e
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()


def copy_range(src_fh, offset: int, length: int, out: HashingWriter, chunk: int = HASH_CHUNK) -> None:
    """Stream `length` bytes from `offset` of an open file into `out` with plain reads (no mmap: pages read
    through a map stay in the process's resident set, which would make a 40 GB copy look like 40 GB of RAM)."""
    buf = bytearray(min(chunk, max(length, 1)))
    view = memoryview(buf)
    src_fh.seek(offset)
    left = length
    while left:
        n = src_fh.readinto(view[:min(left, len(buf))])
        if not n:
            raise QitrtError(f"{getattr(src_fh, 'name', 'source')} ends {left} bytes before the data it should hold")
        out.write(view[:n])
        left -= n


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive advisory lock on `path`.lock, for files several builders update (timing caches)."""
    import fcntl

    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
