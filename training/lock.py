"""One trainer per model: an exclusive lock on ``RUN/checkpoints/NAME.lock`` for a whole training.

Two processes training the same model (two ``dfm train-expert --expert 1`` on one run, say)
would interleave their checkpoints, log lines and final saves; the second is refused instead.

Why ``fcntl.flock`` and not a lock file created with O_EXCL: the kernel drops a flock when its
holder's file descriptor closes, and a process killed by SIGKILL, OOM or a power cut closes all
of them, so no stale lock survives a crash to block ``--resume`` and nobody has to delete one by
hand. The lock file itself stays behind on purpose: only the flock on it means "held" (deleting
the file would let a third process lock a new file while the second still holds the old one).
It lives beside the checkpoint directory, which every trainer writes anyway, so a compute island
(config.json, tokenizer, seed and one shard) needs nothing more, and ``rm -r`` of the checkpoints
does not unlock a running trainer. Linux NFS (v4, or v3 with lockd) maps flock to POSIX record
locks, which hold across machines. The holder writes its pid and host into the file, for the
refusal message only. Where ``fcntl`` does not exist (Windows) or the file system refuses
locks, training runs unguarded, with a warning in the latter case.
"""

from __future__ import annotations

import errno
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dfm.errors import DfmError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: errno of a file system without locks (some FUSE and network mounts): run unguarded
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def lock_path(checkpoint_dir: str | os.PathLike) -> Path:
    """The lock file of the model whose checkpoints live in ``checkpoint_dir``: its sibling NAME.lock."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.with_name(f"{checkpoint_dir.name}.lock")


@contextmanager
def training_lock(path: str | os.PathLike, name: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing) while the body runs.

    Raises DfmError naming ``name``, the lock file and its holder when another process holds it.
    """
    if fcntl is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise DfmError(
                f"{name} is being trained by {holder} (it holds the lock {path}): wait for it "
                f"to finish or stop it, then run this again"
            ) from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            warnings.warn(
                f"cannot lock {path} ({err.strerror}): nothing stops a second trainer of {name}", stacklevel=3
            )
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
