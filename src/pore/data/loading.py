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
    source = str(local) if local.exists() else path
    try:
        stream = _load(source, config, split)
    except ValueError as error:
        if "split" in str(error).lower():
            raise DataError(f"{path}: {error} (set data.split)") from error
        raise DataError(f"cannot read {path!r} (config {config!r}, split {split!r}): {error}") from error
    except (FileNotFoundError, ConnectionError) as error:  # offline, a hub id raises ConnectionError
        raise DataError(
            f"cannot find {path!r} (config {config!r}, split {split!r}): {error}. Without network access, "
            "point data.path at a local folder of parquet files"
        ) from error
    features = stream.features or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            stream = stream.cast_column(name, datasets.Image(decode=False))
    return stream


def _load(source: str, config: str | None, split: str) -> datasets.IterableDataset:
    """Stream one split of `source`, of its sub-folder (config) `config` when given."""
    if not config:
        return datasets.load_dataset(source, split=split, streaming=True)
    try:
        # The lmms-lab layout (push_to_hub's): <config>/<split>-00000-of-00001.parquet. Split names such as
        # GQA's "testdev" or MMBench's "dev" are not found by `data_dir` alone (it knows train/test/...).
        return datasets.load_dataset(
            source, data_files={split: f"{config}/{split}-*"}, split=split, streaming=True
        )
    except FileNotFoundError:
        # Other layouts inside the sub-folder (data/<split>-*, <split>.parquet, ...).
        return datasets.load_dataset(source, data_dir=config, split=split, streaming=True)


def column_names(stream: datasets.IterableDataset) -> list[str]:
    """The stream's columns (from its features, or from its first row when features are unknown)."""
    if stream.features is not None:
        return list(stream.features)
    first = next(iter(stream), None)
    return list(first) if first is not None else []


def count_rows(path: str, config: str | None, split: str) -> int | None:
    """Rows of `split` in a local folder of parquet files, from their metadata (no row is read); None for a
    hub id or other file types (their length is not known before streaming)."""
    import pyarrow.parquet as pq

    local = Path(path).expanduser()
    if not local.is_dir():
        return None
    try:
        data_files = {split: f"{config}/{split}-*"} if config else None
        builder = datasets.load_dataset_builder(str(local), data_files=data_files)
        files = builder.config.data_files[split]
    except Exception:  # an unusual layout: the stream still opens it, only its length stays unknown
        return None
    if not files or not all(str(file).endswith(".parquet") for file in files):
        return None
    return sum(pq.ParquetFile(file).metadata.num_rows for file in files)
