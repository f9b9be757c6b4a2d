"""Open a benchmark table as a `datasets` stream, from a hub id or a local folder, through one call.

`load_dataset(path, split=..., streaming=True)` reads a hub repository or a local folder of parquet files
alike. A config (a named subset, e.g. GQA's `testdev_balanced_images`) is the hub repository's config name,
and in a local folder the sub-folder of that name (the layout of the lmms-lab benchmark repositories).
Image columns are read undecoded, so that a corrupt image fails one row (recorded and skipped), not the
whole stream.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from pore.data.benchmark import DataError


def open_stream(path: str, config: str | None, split: str) -> datasets.IterableDataset:
    """Stream `split` of `path` (hub id or local folder), optionally the sub-folder `config`."""
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise DataError(f"data.path {path!r} is neither a local folder nor a hub id (owner/name)")
    options = {"data_dir": config} if config else {}
    try:
        stream = datasets.load_dataset(
            str(local) if local.exists() else path, split=split, streaming=True, **options
        )
    except ValueError as error:
        if "split" in str(error).lower():
            raise DataError(f"{path}: {error} (set data.split)") from error
        raise DataError(f"cannot read {path!r} (config {config!r}, split {split!r}): {error}") from error
    except FileNotFoundError as error:
        raise DataError(
            f"cannot find {path!r} (config {config!r}): {error}. Without network access, point data.path "
            "at a local folder of parquet files"
        ) from error
    features = stream.features or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            stream = stream.cast_column(name, datasets.Image(decode=False))
    return stream


def column_names(stream: datasets.IterableDataset) -> list[str]:
    """The stream's columns (from its features, or from its first row when features are unknown)."""
    if stream.features is not None:
        return list(stream.features)
    first = next(iter(stream), None)
    return list(first) if first is not None else []
