"""Atomic writes: everything goes to a temporary sibling first, then is renamed into place.

A crash leaves either the old artifact or the new one, never a half-written file or directory.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dfm.errors import DfmError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _plain_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain mkdir/open would: mkdtemp makes 0700,
    and libraries that write through temporary files (safetensors, for one) leave 0600."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the artifact gets what a plain write gets
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on clean exit it replaces ``path`` as a whole.

    Temporary directories that a killed writer of the same ``path`` left behind are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():  # a kill fell between the two renames below: undo it
        os.replace(old, path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _plain_modes(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(directory: str | os.PathLike) -> None:
    """Raise DfmError unless artifacts can be written into ``directory`` (or created beside it),
    so a long job fails before its work, not after. Creates nothing that stays."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DfmError(f"{directory} is a file, not a directory: move it away to write the results there")
    target = directory if directory.is_dir() else directory.parent
    if not target.is_dir():
        return  # nothing to check against: the job itself reports the missing location
    try:
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        raise DfmError(
            f"{target} is not writable ({err.strerror}): make it writable, or copy the run to a writable "
            f"place and use the copy"
        ) from err
