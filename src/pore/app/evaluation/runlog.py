"""`<output_dir>/run.log`: the run's log, written into the folder only once the run has started there.

The records are kept in memory from the run's first check on, and written when the run owns its folder
(the lock), has loaded its model and starts answering; from then on each record is appended as it comes.
A run that fails before that point leaves no trace in the folder, so the `run.log` of a finished run stays
as it was after any failed rerun. A resumed run appends its log to the earlier one's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_NAME = "run.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunLog(logging.Handler):
    """Holds the records until `start(folder)`, then writes them and every later one to run.log."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(FORMAT))
        self.pending: list[logging.LogRecord] = []
        self.stream: TextIO | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.pending.append(record)
            return
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:  # a log line must never fail the run
            self.handleError(record)

    def start(self, folder: Path) -> Path:
        """Write the held records to `<folder>/run.log` and append every later one."""
        path = folder / LOG_NAME
        self.stream = path.open("a", encoding="utf-8")
        held, self.pending = self.pending, []
        for record in held:
            self.emit(record)
        return path

    def write(self, text: str) -> None:
        """Text that is printed rather than logged (the summary table), once the log is started."""
        if self.stream is not None:
            self.stream.write(text.rstrip("\n") + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


@contextlib.contextmanager
def run_log(enabled: bool = True) -> Iterator[RunLog]:
    """A `RunLog` on the root logger for the block (`enabled=False`: a handler that is never started,
    for the ranks other than 0, which share rank 0's folder)."""
    handler = RunLog()
    root = logging.getLogger()
    if enabled:
        root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()
