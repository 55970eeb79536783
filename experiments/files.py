"""Files that survive a kill at any moment, and the lock that keeps one process per run folder.

``atomic_write`` is how every file meant to be read later is written (checkpoints, meta.json,
config.yaml, metrics.csv when a resumed run trims it, token files): the bytes go to a
temporary ``<name>.metaopt-<pid>.tmp`` next to the target (opened without following a symbolic
link), are flushed to the disk (fsync), and then replace the target by a rename, so a reader, or
the next run after a SIGKILL or a power cut, finds the old file or the new one, never a part of
one. ``remove_temporaries`` clears the temporaries that killed writers leave behind, and only
those: a user's own ``notes.1.tmp`` stays.

``RunLock`` keeps one process per run folder, with two locks that the kernel drops when their
process dies, however it dies (so a stale lock is taken over by the next run):
- an exclusive ``flock`` on ``<run folder>/run.lock`` holding the owner's PID and host, which
  processes on other hosts of a shared file system see too;
- for a folder under run_root, an ``flock`` on ``run_root/.locks/<hash of its path below run_root>.lock``,
  outside the folder: deleting a live run's folder (and running the command again, on any host that
  shares run_root) no longer gives the folder a second writer;
- on Linux, a Unix socket in the abstract namespace named from the folder's real path, which no
  file operation can remove: on that host, deleting the run folder, its ``run.lock`` or the
  ``.locks`` file while the run lives no longer gives the folder a second writer either.
A second process stops at once naming the first. A file system that cannot lock (NFS mounted with
``nolock``, Lustre without ``flock``) stops the run before it starts, naming the folder, rather than
leaving the folder unguarded. ``run.lock`` is opened without following a symbolic link and never
truncated before it is locked, so a link planted there cannot empty another file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import socket
import struct
import sys
from typing import IO, Any, Iterator

LOCK_NAME = "run.lock"
LOCKS_FOLDER = ".locks"  # under run_root: <hash of a run folder's path below run_root>.lock
_TEMPORARY = re.compile(r"\.metaopt-\d+\.tmp$")  # <name>.metaopt-<pid>.tmp, as temporary_name names them


def temporary_name(path: str) -> str:
    """Where a writer of this process puts ``path``'s next version before renaming it over ``path``."""
    return f"{path}.metaopt-{os.getpid()}.tmp"


def open_no_follow(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symbolic link at ``path`` (ELOOP), naming the file."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(error.errno, f"{path} is a symbolic link, which a run never follows (it could make the "
                                       f"run write another file): remove it (rm {path}) and run again") from None
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit, sync it and rename it over ``path``.

    An exception inside the block removes the temporary and leaves ``path`` as it was.
    """
    partial = temporary_name(path)
    try:
        with open(partial, mode, opener=lambda name, flags: open_no_follow(name, flags), **open_kwargs) as f:
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
    """Delete the ``<name>.metaopt-<pid>.tmp`` files of writers that were killed; returns their paths.

    Call it only while holding the folder's RunLock: then no live writer owns one of them.
    """
    stale = [path for path in glob.glob(os.path.join(glob.escape(folder), "*.tmp")) if _TEMPORARY.search(path)]
    for path in stale:
        os.remove(path)
    return stale


def read_json(path: str, fix: str) -> Any:
    """The JSON value of a file; an unreadable one raises ValueError naming the file and ``fix``."""
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}): {fix}") from None


class RunFolderInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


class LockingUnsupported(RuntimeError):
    """The run folder's file system cannot lock files."""


class RunLock:
    """An exclusive lock on a run folder for the life of a ``with`` block (see the module docstring)."""

    def __init__(self, run_dir: str, run_root: str | None = None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.descriptor: int | None = None
        self.socket: socket.socket | None = None
        # a folder under run_root is also locked by a file outside it, named from its path below run_root
        # (the same on every host that mounts run_root): deleting the folder does not delete that lock
        self.root_path: str | None = None
        self.root_descriptor: int | None = None
        if run_root is not None:
            root, folder = os.path.realpath(run_root), os.path.realpath(run_dir)
            if folder.startswith(root + os.sep):
                key = hashlib.sha256(os.path.relpath(folder, root).encode()).hexdigest()[:32]
                self.root_path = os.path.join(root, LOCKS_FOLDER, f"{key}.lock")

    def __enter__(self) -> RunLock:
        # the abstract namespace is Linux's: elsewhere (macOS) the flock on run.lock alone guards the folder
        self.socket = self._bind_folder_name() if sys.platform.startswith("linux") else None
        try:
            self.descriptor = self._lock_file(self.path)
            if self.root_path is not None:
                os.makedirs(os.path.dirname(self.root_path), exist_ok=True)
                self.root_descriptor = self._lock_file(self.root_path)
        except BaseException:
            self._release()
            raise
        return self

    def _close_socket(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def _bind_folder_name(self) -> socket.socket:
        """The socket named from the folder's real path: a second binder on this host gets EADDRINUSE,
        and the holder's PID from the socket itself (SO_PEERCRED)."""
        name = "\0metaopt-run-" + hashlib.sha256(os.path.realpath(self.run_dir).encode()).hexdigest()[:32]
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            holder.bind(name)
            holder.listen(64)
        except OSError as error:
            holder.close()
            if error.errno != errno.EADDRINUSE:
                raise
            raise RunFolderInUse(self._in_use(self._peer_pid(name), socket.gethostname())) from None
        return holder

    @staticmethod
    def _peer_pid(name: str) -> str:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(name)
            credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return str(struct.unpack("3i", credentials)[0])
        except OSError:
            return "?"
        finally:
            probe.close()

    def _in_use(self, pid: str, host: str) -> str:
        return (f"{self.run_dir} is in use by process {pid} on {host}: two processes in one run folder would "
                f"interleave its metrics.csv and checkpoints (deleting the folder or its {LOCK_NAME} does not stop "
                f"that process). Wait for that run to end, or stop it (kill {pid} on that host; it checkpoints) and "
                "run this command again to continue it; to run a second copy, use another run_root or seed.")

    def _lock_file(self, path: str) -> int:
        """An exclusive flock on ``path``, which then holds this process's PID and host."""
        descriptor = open_no_follow(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 256).decode(errors="replace").split()
            os.close(descriptor)
            pid, host = (holder + ["?", "?"])[:2]
            raise RunFolderInUse(self._in_use(pid, host)) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            raise LockingUnsupported(
                f"cannot lock {path}: its file system does not support flock ({error.strerror}), and "
                "without the lock two processes could write one run folder at once. Put the runs on a file "
                "system that locks: run_root=<a local disk, or a network file system mounted with locking, "
                "e.g. NFS without 'nolock', Lustre with 'flock'>"
            ) from error
        os.ftruncate(descriptor, 0)  # once locked: the file is ours
        os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return descriptor

    def __exit__(self, *exc_info) -> None:
        self._release()

    def _release(self) -> None:
        # the files stay: unlinking one would let a waiting opener and a new one lock two different files
        for name in ("root_descriptor", "descriptor"):
            descriptor = getattr(self, name)
            if descriptor is not None:
                os.ftruncate(descriptor, 0)
                fcntl.flock(descriptor, fcntl.LOCK_UN)
                os.close(descriptor)
                setattr(self, name, None)
        self._close_socket()
