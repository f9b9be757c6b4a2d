"""A sweep's folder: the Optuna storage (a journal file), the trials' run folders, logs and locks.

    <dir>/sweep.json          the sweep's identity (method, space, metric, fixed settings); a rerun must match
    <dir>/optuna.journal      every ask and tell, appended (Optuna's JournalStorage): the resumable state
    <dir>/runs/<name>/        one output_dir per parameter set (predictions resume there after a crash)
    <dir>/logs/trial-<n>.log  the trial's stdout and stderr, appended on every attempt
    <dir>/locks/              `study.lock` (one ask or tell at a time) and `trial-<n>.lock` (held while the
                              trial runs, by the runner and the run itself)

A trial that is RUNNING in the journal while its lock is free lost its runner (killed, node died): the next
runner claims it and runs it again in the same output_dir, and tells that same trial, so it is neither lost
nor counted twice. The locks are `flock`s, released by the kernel when their holders die.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from pore.app.sweeps.spec import digest

STUDY = "sweep"


class SweepStateError(RuntimeError):
    """The folder holds another sweep, or is not a sweep folder."""


def default_dir(name: str, identity: dict[str, Any], root: str | Path = "outputs/sweeps") -> Path:
    """`outputs/sweeps/<name>-<digest of the identity>`: rerunning the same command finds the same folder."""
    return Path(root) / f"{name}-{digest(identity)}"


def trial_dir_name(params: dict[str, Any], swept: list[str]) -> str:
    """`<swept values>-<digest of all values>`: readable, and the same for the same parameter set."""
    readable = "_".join(
        f"{params[name]:.4g}" if isinstance(params[name], float) else str(params[name])
        for name in swept
        if name in params
    )
    readable = re.sub(r"[^A-Za-z0-9.+-]+", "_", readable).strip("_")[:60] or "run"
    return f"{readable}-{digest(params)}"


class SweepDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.journal = self.root / "optuna.journal"
        self.identity_file = self.root / "sweep.json"
        self.runs = self.root / "runs"
        self.logs = self.root / "logs"
        self.locks = self.root / "locks"
        self._storage: JournalStorage | None = None

    def exists(self) -> bool:
        return self.journal.exists()

    def create(self, identity: dict[str, Any], direction: str) -> None:
        """Make the folder (or check that it holds this same sweep) and its study."""
        for folder in (self.root, self.runs, self.logs, self.locks):
            folder.mkdir(parents=True, exist_ok=True)
        with self.study_lock():
            self._repair()
            if self.identity_file.exists():
                self.check_identity(identity)
            else:
                self.identity_file.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
            optuna.create_study(
                study_name=STUDY, storage=self.storage(), direction=direction, load_if_exists=True
            )

    def _repair(self) -> None:
        """Undo what a runner killed in the middle of a journal write left (called under the study lock).

        A torn last line is an operation that never happened; left in place, the next append would make the
        journal unreadable. Optuna's own lock file can only be stale here: every write of every runner
        happens under the study lock, which this process holds.
        """
        Path(f"{self.journal}.lock").unlink(missing_ok=True)
        if not self.journal.exists():
            return
        with self.journal.open("rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)

    def check_identity(self, identity: dict[str, Any]) -> None:
        saved = json.loads(self.identity_file.read_text())
        ours = json.loads(json.dumps(identity, sort_keys=True))
        if saved != ours:
            differ = sorted(key for key in set(saved) | set(ours) if saved.get(key) != ours.get(key))
            details = "; ".join(f"{key}: {saved.get(key)} there, {ours.get(key)} now" for key in differ)
            raise SweepStateError(
                f"{self.root} holds another sweep ({details}). Resume it with the same file and overrides, "
                "or choose another --dir"
            )

    def storage(self) -> JournalStorage:
        return JournalStorage(JournalFileBackend(str(self.journal)))

    def load(self) -> optuna.Study:
        """The study, read afresh from the journal (other runners may have written since)."""
        if not self.exists():
            raise SweepStateError(
                f"{self.root} is not a sweep folder (no optuna.journal): nothing to show yet"
            )
        self._storage = self.storage()
        return optuna.load_study(study_name=STUDY, storage=self._storage)

    def set_user_attr(self, number: int, key: str, value: Any) -> None:
        """Record `key` on trial `number` of the study last loaded (the trial may be another runner's)."""
        storage = self._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(STUDY), number
        )
        storage.set_trial_user_attr(trial_id, key, value)

    @contextlib.contextmanager
    def study_lock(self) -> Iterator[None]:
        """Serialises ask / claim / tell between runners sharing this folder (one per GPU, say)."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with open(self.locks / "study.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _lock(self, name: str, wait: bool) -> int | None:
        fd = os.open(self.locks / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def try_lock_trial(self, number: int) -> int | None:
        """An fd holding trial `number`'s lock, or None when a live runner (or its run) holds it."""
        return self._lock(f"trial-{number}", wait=False)

    def lock_run_dir(self, output_dir: Path) -> int:
        """Waits until no other trial writes `output_dir` (two trials with the same settings, two runners)."""
        fd = self._lock(f"run-{output_dir.name}", wait=True)
        assert fd is not None
        return fd

    def trial_is_held(self, number: int) -> bool:
        fd = self.try_lock_trial(number)
        if fd is None:
            return True
        os.close(fd)
        return False

    def run_dir(self, name: str) -> Path:
        return self.runs / name

    def log_file(self, number: int) -> Path:
        return self.logs / f"trial-{number}.log"
