"""One writer per output directory: an exclusive lock held for the whole run.

``train``, ``train-tokenizer``, ``cache-latents``, ``sample-many`` (and so ``evaluate``) and ``sweep``
hold ``RunLock`` on their output while they run, so two runs can never interleave their files (two
trainings in one directory once produced a checkpoint whose weights came from one run and whose
``state.json`` came from the other). The lock is ``fcntl.flock`` on a lock file (``<output_dir>/.lock``;
``.<name>.lock`` beside an output file),
which holds the holder's pid, host and start time as JSON for the refusal message. The kernel drops a
flock when its process dies, however it dies, so a crashed run never blocks the next one; a record left by
a dead process is reported and taken over. Where the filesystem has no flock (some network filesystems),
the record alone decides: a live holder refuses the run, a dead one on this host is taken over.

In a multi-process launch the first process takes the lock before any process writes (``hold``): one lock
per run. Torch-free, like ``config.py``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlm.config import ConfigError

if TYPE_CHECKING:
    from latentlm.distributed import Distributed

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
ORPHAN_WAIT_S = 30.0  # a killed run's DataLoader workers check for their parent every 5 s
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


class RunLocked(ConfigError):
    """Another live process holds the lock (exit code 2, like every refused start)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether the lock record names a process of this host that no longer runs."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not _pid_alive(pid)


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"


def lock_file(target: str | os.PathLike, directory: bool = True) -> Path:
    """Where the lock of ``target`` lives: ``<dir>/.lock`` for a directory, ``.<name>.lock`` beside a file
    (``sample-many``'s ``.npz``, so two outputs in one folder do not block each other)."""
    target = Path(target)
    return target / LOCK_FILE if directory else target.with_name(f".{target.name}.lock")


class RunLock:
    """An exclusive lock on ``target`` (a run directory or an output file); ``option`` names its flag."""

    def __init__(self, target: str | os.PathLike, option: str = "--output-dir", directory: bool = True) -> None:
        self.target, self.option = Path(target), option
        self.path = lock_file(self.target, directory)
        self._fd: int | None = None

    def _read_holder(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            holder = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict[str, Any]) -> RunLocked:
        if _dead_here(holder):
            return RunLocked(f"{self.target} was being written by {_describe(holder)}, which has died, but processes "
                             f"it started still hold its lock; end them, or use another {self.option}")
        return RunLocked(f"{self.target} is being written by {_describe(holder)}; wait for it or use another "
                         f"{self.option}")

    def _flock(self, fd: int) -> bool:
        """flock ``fd``: True once locked, False where the filesystem has no flock; ``RunLocked`` when a live
        process holds it. A killed holder's forked children (DataLoader workers) keep its lock until they
        notice, within seconds: wait up to ``ORPHAN_WAIT_S`` for them."""
        import fcntl

        deadline = time.monotonic() + ORPHAN_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                holder = self._read_holder(fd)
                if not _dead_here(holder) or time.monotonic() > deadline:
                    raise self._refuse(holder) from None
                time.sleep(0.2)
            except OSError as err:
                if err.errno in _NO_FLOCK:
                    return False
                raise

    def acquire(self) -> None:
        """Take the lock or raise ``RunLocked`` naming its holder (``ConfigError`` when its folder is unwritable)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise ConfigError(f"{self.option} {self.target}: cannot write to {self.path.parent} "
                              f"({err.strerror or err}); choose a writable directory") from err
        try:
            flocked = self._flock(fd)
            holder = self._read_holder(fd)
            if holder.get("pid") not in (None, os.getpid()) or holder.get("host") not in (None, socket.gethostname()):
                if not flocked and not _dead_here(holder):  # no flock: only the record tells
                    raise self._refuse(holder)
                log.warning("%s: taking over the stale lock of %s, which is no longer running", self.target,
                            _describe(holder))
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Clear the record and drop the lock (the file stays: deleting it would let two runs lock two files)."""
        import fcntl

        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            # Explicitly: forked DataLoader workers share this descriptor, and would keep a plain close's lock.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def hold(target: str | os.PathLike, dist: Distributed, option: str = "--output-dir", directory: bool = True
         ) -> Iterator[None]:
    """The run's lock on ``target`` for the duration: the first process takes it, every process learns the
    outcome (a refusal is the same ``ConfigError`` everywhere) before any of them writes."""
    lock = RunLock(target, option, directory) if dist.is_main else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except ConfigError as err:
            error = (type(err).__name__, str(err))
    error = dist.broadcast(error)
    if error is not None:
        raise (RunLocked if error[0] == RunLocked.__name__ else ConfigError)(error[1])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
