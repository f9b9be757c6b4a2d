"""Where the files shipped with the project live: the embedded model, benchmark, calibration, architectures.

`assets_root()` is `$PORE_ASSETS` when set, else the repository's `assets/` folder. Configs name these files
as `${asset:<relative path>}`, and stored configs and run digests write them as `asset:<relative path>`
(`portable`), so that a moved checkout resumes its runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[2]  # src/pore/assets.py -> the checkout


def assets_root() -> Path:
    """The folder of the shipped files: $PORE_ASSETS when set, else the repository's `assets/`."""
    return Path(os.environ.get("PORE_ASSETS") or REPOSITORY / "assets")


def asset_path(name: str) -> str:
    """A file shipped in the assets folder, by its path relative to it (the `${asset:...}` resolver)."""
    return str(assets_root() / name)


def portable(value: Any) -> Any:
    """`value` with paths inside the assets folder written as `asset:<relative path>`, so that digests and
    stored configs do not change when the checkout moves (nested dicts and lists are rewritten too)."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item) for item in value]
    if isinstance(value, str) and value:
        root = str(assets_root())
        if value == root or value.startswith(root + os.sep):
            return "asset:" + Path(os.path.relpath(value, root)).as_posix()
    return value
