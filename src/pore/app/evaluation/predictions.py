"""predictions.jsonl: written row by row, readable after a crash, merged across ranks without loss.

Each rank appends to its own `predictions.rank<r>.jsonl` and flushes after every batch. A crash can leave a
half-written last line: readers skip it, and a rank cuts it off before appending again. When a run ends,
rank 0 merges the rank files into `predictions.jsonl` (one row per question id, sorted) with an atomic rename,
then removes the rank files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MERGED = "predictions.jsonl"
# The strategy the engine ran, resolved for the model (a preset's layers scaled to its depth): beside the
# config, which holds the strategy as written.
STRATEGY_FILE = "strategy.json"
RANK_PATTERN = "predictions.rank*.jsonl"
log = logging.getLogger("pore")


def rank_file(output_dir: Path, rank: int) -> Path:
    return output_dir / f"predictions.rank{rank}.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a jsonl file; a torn last line (crash mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # the last line was never finished
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def cut_torn_tail(path: Path) -> None:
    """Truncate an unfinished last line so that appended rows start on a line of their own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows and push them to disk before returning."""
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def unique_rows(output_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the merged file and of every rank file, first occurrence of each question id kept, and the
    ids of the rows dropped for repeating an earlier row's id (in reading order)."""
    seen: set[str] = set()
    rows, dropped = [], []
    for path in [output_dir / MERGED, *sorted(output_dir.glob(RANK_PATTERN))]:
        for row in read_rows(path):
            if row["question_id"] not in seen:
                seen.add(row["question_id"])
                rows.append(row)
            else:
                dropped.append(row["question_id"])
    return rows, dropped


def all_rows(output_dir: Path) -> list[dict[str, Any]]:
    """Rows of the merged file and of every rank file, first occurrence of each question id kept."""
    return unique_rows(output_dir)[0]


def done_ids(output_dir: Path) -> frozenset[str]:
    """Question ids already answered (or already failed) in this output folder."""
    return frozenset(row["question_id"] for row in all_rows(output_dir))


def merge(output_dir: Path) -> list[dict[str, Any]]:
    """Merge every rank's rows into predictions.jsonl (atomically) and remove the rank files."""
    rows, dropped = unique_rows(output_dir)
    if dropped:
        # Two rows with one id: the benchmark's ids are not unique (or a question was asked twice); only the
        # first row is scored, so the metric covers fewer rows than were answered.
        shown = ", ".join(repr(question_id) for question_id in sorted(set(dropped))[:5])
        log.warning(
            "%d prediction rows were dropped because their question_id repeats an earlier row's (%s%s); "
            "only the first row of each id is scored. Check that the benchmark's question ids are unique "
            "(data.columns.question_id)",
            len(dropped),
            shown,
            ", ..." if len(set(dropped)) > 5 else "",
        )
    rows = sorted(rows, key=lambda row: row["question_id"])
    merged = output_dir / MERGED
    partial = merged.with_suffix(".jsonl.tmp")
    with partial.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(merged)
    for path in output_dir.glob(RANK_PATTERN):
        path.unlink()
    return rows
