"""One training run per output folder: an OS lock on ``<output>/.run.lock`` held for the run's whole life.

The lock is ``fcntl.flock`` on an open file, so the kernel drops it when the process ends, however it ends
(SIGKILL, OOM, a crash): nothing stale is ever left to clean up. The file itself stays (removing a lock file
while another process may be opening it would let two runs lock two different files); it holds one line about
its holder (host, PID, start time, command) that a second start quotes in its error.

Network file systems: on Linux NFS ``flock`` is carried out as a POSIX lock through the server's lock manager
(NFSv4, or v3 with lockd), so runs on different hosts exclude each other; with the ``nolock`` / ``local_lock``
mount options it is local to each client, and two hosts are not kept apart. Lustre needs the ``flock`` mount
option (otherwise the call fails). Where the file system cannot lock at all the run goes on unlocked, with a
warning.

No torch here: the lock is taken before anything heavy runs.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import time
from typing import Optional

LOCK_NAME = '.run.lock'


class RunLockedError(RuntimeError):
    """Another live process holds the output folder's run lock; the message names it and what to do."""


class RunLock:
    """The run lock of ``output_dir``: ``acquire()`` takes it (creating the folder and the lock file only) or
    raises ``RunLockedError``; it is held until ``release()`` or the process ends."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock. Returns None, or a warning when the file system cannot lock (the run goes on
        unlocked). Raises ``RunLockedError`` when another process holds it."""
        import fcntl  # POSIX only; imported here so that the module imports anywhere
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = holder or 'it has not written its details yet'
                raise RunLockedError(
                    f"output folder {self.output_dir} is in use by a running training run ({holder}); wait for it "
                    f"to finish, or start this one elsewhere with --tag NAME or --output PATH") from None
            return (f"cannot lock {self.path} ({e.strerror or e}; e.g. NFS mounted with nolock, Lustre without "
                    f"flock): a second run started into this folder would not be stopped")
        holder = (f"host {socket.gethostname()}, PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                  f"command: {' '.join(sys.argv)[:300]}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder + '\n').encode(), 0)
        self.fd = fd
        # A forked child (a DataLoader worker) would share the lock and keep it alive after this process died
        # (SIGKILL, OOM) until the worker noticed: the child closes its copy at once (the lock stays ours).
        os.register_at_fork(after_in_child=self._close_in_child)
        return None

    def _close_in_child(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def release(self) -> None:
        """Let go of the lock (the process's end does the same)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 1000, 0).decode(errors='replace').strip()
    except OSError:
        return ''
