"""One writer per run folder: `<output_dir>/run.lock`, held by the run that writes there.

The lock file is created atomically (O_CREAT | O_EXCL) and holds the owner's pid, host and start time. A
second run into the same folder is refused while the owner lives; a lock left by a process that died on
this host (killed, out of memory) is taken over. A lock from another host cannot be checked from here: it
is refused, and the message says which file to delete once that run is known to be gone.

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
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or not ours: treated as held


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
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released in between: try again
                if self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise FolderInUseError(self._message(holder)) from None
            with os.fdopen(descriptor, "w") as handle:
                json.dump(owner, handle)
            self.held = True
            return self
        raise FolderInUseError(self._message(_read(self.path) or {}))

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        """A lock of a process of this host that no longer exists."""
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

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
