"""One writer per run folder: `<output_dir>/run.lock`, held by the run that writes there.

The lock file is created atomically (O_CREAT | O_EXCL) and holds the owner's pid, host and start time. A
second run into the same folder is refused while the owner lives; a lock left by a process that died on
this host (killed, out of memory) is taken over. A lock from another host cannot be checked from here: it
is refused, and the message says which file to delete once that run is known to be gone. A file that is
not a lock of this program (garbage, or empty for more than a second) is refused with what it holds.

Under DDP only global rank 0 takes the lock: the ranks of one run share its folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from pore.errors import UserError

LOCK_NAME = "run.lock"
ATTEMPTS = 40  # tries to take the lock: a released or stale lock is retried, one being written waited for
WRITE_WAIT_S = 0.05
FRESH_S = 1.0


class FolderInUseError(UserError):
    """Another live run writes into this output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's owner; None when there is no lock, {} when its content is not an owner (being written
    right now, or not a lock of this program)."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_owner(holder: dict[str, Any]) -> bool:
    return isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)


class RunLock:
    """`with RunLock(output_dir):` holds the folder for the block (a killed run's lock is taken over)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(ATTEMPTS):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released in between: try again
                if not _is_owner(holder):
                    if self._being_written():
                        time.sleep(WRITE_WAIT_S)
                        continue
                    raise FolderInUseError(self._foreign_message()) from None
                if self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise FolderInUseError(self._message(holder)) from None
            with os.fdopen(descriptor, "w") as handle:
                json.dump(owner, handle)
            self.held = True
            return self
        holder = _read(self.path) or {}
        raise FolderInUseError(self._message(holder) if _is_owner(holder) else self._foreign_message())

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        """A lock of a process of this host that no longer exists."""
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

    def _being_written(self) -> bool:
        """A lock file younger than a second without its owner yet: another run is writing it right now."""
        try:
            return time.time() - self.path.stat().st_mtime < FRESH_S
        except FileNotFoundError:
            return True

    def _foreign_message(self) -> str:
        try:
            content = self.path.read_text(errors="replace")[:40]
        except OSError as error:
            content = f"<unreadable: {error.strerror}>"
        return (
            f"{self.path} is not a lock written by this program (it holds {content!r}, not a pid, host and "
            f"start time); if no run is writing into {self.path.parent}, delete {self.path} and run again"
        )

    def _message(self, holder: dict[str, Any]) -> str:
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
        )
        return (
            f"{self.path.parent} is in use by another run ({who}); wait for it to finish or choose another "
            f"output_dir (delete {self.path} only if that run is gone)"
        )

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = _read(self.path)
            if holder and holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
