"""Output files and folders: create them, or say in one line why not; write atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from samplescope.errors import SamplescopeError

__all__ = ["atomic_output", "ensure_writable_dir", "same_file"]


def ensure_writable_dir(folder: Path, error: type[SamplescopeError]) -> None:
    """Create ``folder`` (with parents) and check it is writable.

    Raises:
        error: with a one-line message naming the folder and the reason.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create {folder}: {exc.strerror or exc}"
        raise error(msg) from None
    if not os.access(folder, os.W_OK):
        msg = f"cannot write to {folder}: permission denied"
        raise error(msg)


@contextmanager
def atomic_output(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` at once.

    A failure or an interrupt (Ctrl-C included) removes the temporary file and leaves
    ``target`` as it was: never a half-written output, never a lost older one. The file gets
    the permissions a plain ``open(target, "w")`` would give it.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (existing or not: resolved paths compared)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()
