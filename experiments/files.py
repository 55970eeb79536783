"""Files that survive a kill at any moment, and the lock that keeps one process per run folder.

``atomic_write`` is how every file meant to be read later is written (checkpoints, meta.json,
config.yaml, metrics.csv when a resumed run trims it, token files): the bytes go to a
temporary ``<name>.<pid>.tmp`` next to the target, are flushed to the disk (fsync), and then
replace the target by a rename, so a reader, or the next run after a SIGKILL or a power cut,
finds the old file or the new one, never a part of one. ``remove_temporaries`` clears the
temporaries that killed writers leave behind.

``RunLock`` is an exclusive ``flock`` on ``<run folder>/run.lock`` holding the owner's PID and
host: a second process on the same folder stops at once naming them. The kernel drops the
lock when its process dies, however it dies, so a stale lock is taken over by the next run.
A file system that cannot lock (NFS mounted with ``nolock``, Lustre without ``flock``) stops the
run before it starts, naming the folder, rather than leaving the folder unguarded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import socket
from typing import IO, Iterator

LOCK_NAME = "run.lock"
_TEMPORARY = re.compile(r"\.\d+\.tmp$")  # <name>.<pid>.tmp, as atomic_write names them


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit, sync it and rename it over ``path``.

    An exception inside the block removes the temporary and leaves ``path`` as it was.
    """
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with open(partial, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
    sync_directory(os.path.dirname(path))


def sync_directory(folder: str) -> None:
    """fsync a folder, so that the renames and links made in it are on the disk too."""
    descriptor = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_temporaries(folder: str) -> list[str]:
    """Delete the ``<name>.<pid>.tmp`` files of writers that were killed; returns their paths.

    Call it only while holding the folder's RunLock: then no live writer owns one of them.
    """
    stale = [path for path in glob.glob(os.path.join(glob.escape(folder), "*.tmp")) if _TEMPORARY.search(path)]
    for path in stale:
        os.remove(path)
    return stale


class RunFolderInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


class LockingUnsupported(RuntimeError):
    """The run folder's file system cannot lock files."""


class RunLock:
    """An exclusive lock on a run folder for the life of a ``with`` block (see the module docstring)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.descriptor: int | None = None

    def __enter__(self) -> RunLock:
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 256).decode(errors="replace").split()
            os.close(descriptor)
            pid, host = (holder + ["?", "?"])[:2]
            raise RunFolderInUse(
                f"{self.run_dir} is in use by process {pid} on {host}: two processes in one run folder would "
                f"interleave its metrics.csv and checkpoints. Wait for that run to end, or stop it (kill {pid} "
                "on that host; it checkpoints) and run this command again to continue it; to run a second copy, "
                "use another run_root or seed."
            ) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            raise LockingUnsupported(
                f"cannot lock {self.path}: its file system does not support flock ({error.strerror}), and "
                "without the lock two processes could write one run folder at once. Put the runs on a file "
                "system that locks: run_root=<a local disk, or a network file system mounted with locking, "
                "e.g. NFS without 'nolock', Lustre with 'flock'>"
            ) from error
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.descriptor = descriptor
        return self

    def __exit__(self, *exc_info) -> None:
        # the file stays: unlinking it would let a waiting opener and a new one lock two different files
        os.ftruncate(self.descriptor, 0)
        fcntl.flock(self.descriptor, fcntl.LOCK_UN)
        os.close(self.descriptor)
        self.descriptor = None
