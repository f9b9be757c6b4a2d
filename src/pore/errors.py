"""Mistakes a user can fix (a setting, a path, a column) end a command with one line, not a traceback.

The command-line entries (src/run.py, src/bench.py) run their work inside `user_errors()`: a `UserError`
prints `error: <message>` on stderr and exits with status 2. Anything else is a bug or an unexpected
failure and keeps its full traceback (status 1).
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from collections.abc import Iterable, Iterator

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem with the settings or the input that the message tells how to fix."""


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """' (did you mean keep?)' when a choice is close to `name` (each shown after `prefix`), else ''."""
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(prefix + choice for choice in close)}?)" if close else ""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` into one line on stderr and exit status 2."""
    try:
        yield
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None


def one_line(error: BaseException | str) -> str:
    """The message on one line (a wrapped library message keeps its words, not its line breaks)."""
    text = " ".join(str(error).split())
    return text or (type(error).__name__ if isinstance(error, BaseException) else "")
