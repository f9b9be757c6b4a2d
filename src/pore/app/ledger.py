"""Published numbers against finished runs: the ledger (docs/ledger.csv) matched to run folders.

A ledger row is one number a paper reports: for a model, a strategy at a token budget, a benchmark and a
protocol, the value of one metric, with where it comes from (paper, table, checkpoint). A run matches a row
when its config has the same model (`model.name`), strategy (`strategy.name`), budget (`strategy.keep`,
"a/b/c" for a multi-stage strategy; empty for an unpruned run), benchmark (`data.name`) and protocol
(`protocol.name`); the row's `metric` is a key of the run's metrics.json (empty: the benchmark's
headline), multiplied by `scale` (100 for a share printed as a percentage, 1 for MME points) to be in the
paper's units.

    python src/ledger.py RUN_DIR [RUN_DIR ...] [--ledger docs/ledger.csv]

prints paper, measured and delta for every matched row, then the rows no run matched and the runs no row
matched. A RUN_DIR may be a multirun / sweep folder: every run folder under it is read.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pore.app.comparison.runs import RunResult, is_run_folder, load_result
from pore.app.evaluation.uncertainty import headline_key
from pore.errors import UserError, user_errors

DEFAULT_LEDGER = Path(__file__).resolve().parents[3] / "docs" / "ledger.csv"
KEY_COLUMNS = ("model", "strategy", "budget", "benchmark", "protocol")
COLUMNS = (*KEY_COLUMNS, "metric", "scale", "value", "method", "paper", "table", "checkpoint", "note")

Key = tuple[str, str, str, str, str]  # model, strategy, budget ("" = unpruned), benchmark, protocol


@dataclass(frozen=True)
class LedgerRow:
    """One published number and its source."""

    model: str
    strategy: str
    budget: str
    benchmark: str
    protocol: str
    metric: str  # a metrics.json key; "" = the benchmark's headline
    scale: float  # measured * scale is in the paper's units
    value: float
    method: str  # the method as the paper names it ("FastV + PoRe")
    paper: str
    table: str
    checkpoint: str
    note: str

    @property
    def key(self) -> Key:
        return (self.model, self.strategy, self.budget, self.benchmark, self.protocol)


def _number(text: str, column: str, line: int, path: Path) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{path}:{line}: column {column!r} must be a number, got {text!r}") from None


def read_ledger(path: str | Path) -> list[LedgerRow]:
    """The ledger's rows; a `UserError` naming the file and line for a missing column or a bad number."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"cannot read the ledger {path}: {error.strerror}; pass --ledger PATH") from None
    # (file line number, line) without the "#" comment lines; one CSV record per line
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if not line.startswith("#")]
    reader = csv.DictReader(line for _, line in lines)
    missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise UserError(
            f"{path}: the ledger needs the columns {', '.join(COLUMNS)}; missing: {', '.join(missing)}"
        )
    rows = []
    for (line, _), raw in zip(lines[1:], reader, strict=False):
        cells = {column: (raw[column] or "").strip() for column in COLUMNS}
        scale = _number(cells.pop("scale") or "1", "scale", line, path)
        value = _number(cells.pop("value"), "value", line, path)
        rows.append(LedgerRow(scale=scale, value=value, **cells))
    return rows


def run_key(run: RunResult) -> Key:
    """The ledger key of a run, from its saved config (and strategy.json's method)."""
    config = run.config
    strategy = config.strategy
    keep = strategy.get("keep") if run.prunes else None
    if keep is None:
        budget = ""
    elif isinstance(keep, (int, float)):
        budget = str(int(keep))
    else:  # a multi-stage strategy keeps a count per stage: "303/110/36"
        budget = "/".join(str(int(k)) for k in keep)
    return (
        str(config.model.name),
        str(strategy.name),
        budget,
        str(config.data.name),
        str(config.protocol.name),
    )


def find_runs(paths: Iterable[str | Path]) -> list[RunResult]:
    """Every run folder given, or found under a given folder (a multirun / sweep), in path order."""
    runs = []
    for given in map(Path, paths):
        if is_run_folder(given):
            runs.append(load_result(given))
            continue
        found = sorted(config.parent for config in given.rglob("config.yaml") if is_run_folder(config.parent))
        if not found:
            raise UserError(f"{given} is neither a run folder nor a folder holding run folders (config.yaml)")
        runs += [load_result(folder) for folder in found]
    return runs


@dataclass(frozen=True)
class Match:
    row: LedgerRow
    run: RunResult
    measured: float | None  # None: the run's metrics.json lacks the row's metric

    @property
    def delta(self) -> float | None:
        return None if self.measured is None else self.measured - self.row.value


def measured_value(row: LedgerRow, run: RunResult) -> float | None:
    key = row.metric or headline_key(run.metrics)
    value = run.metrics.get(key) if key else None
    if not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value) * row.scale


def match_runs(
    ledger: Sequence[LedgerRow], runs: Sequence[RunResult]
) -> tuple[list[Match], list[LedgerRow], list[RunResult]]:
    """(matches, ledger rows no run matched, runs no row matched). Every run of a key matches its rows."""
    by_key: dict[Key, list[RunResult]] = {}
    for run in runs:
        by_key.setdefault(run_key(run), []).append(run)
    matches, unmatched = [], []
    for row in ledger:
        found = by_key.get(row.key, [])
        matches += [Match(row, run, measured_value(row, run)) for run in found]
        if not found:
            unmatched.append(row)
    used = {row.key for row in ledger}
    return matches, unmatched, [run for run in runs if run_key(run) not in used]


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def format_report(
    matches: Sequence[Match], unmatched: Sequence[LedgerRow], spare: Sequence[RunResult]
) -> str:
    """Markdown: the matched rows (paper, measured, delta, source), then what could not be matched."""
    lines = [
        "| model | strategy | budget | benchmark | protocol | metric | paper | measured | delta | source "
        "| run |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for m in matches:
        row = m.row
        budget = row.budget or "all"
        source = f"{row.paper}, {row.table}"
        lines.append(
            f"| {row.model} | {row.strategy} | {budget} | {row.benchmark} | {row.protocol} | "
            f"{row.metric or 'headline'} | {_fmt(row.value)} | {_fmt(m.measured)} | {_fmt(m.delta, True)} | "
            f"{source} | {m.run.path} |"
        )
    lines.append("")
    lines.append(f"ledger rows without a run ({len(unmatched)}):")
    lines += [
        f"- {', '.join(row.key[:2])}, budget {row.budget or 'all'}, {row.benchmark}, {row.protocol}: "
        f"{row.value:g} ({row.paper}, {row.table})"
        for row in unmatched
    ]
    lines.append(f"runs without a ledger row ({len(spare)}):")
    lines += [f"- {run.path}: {', '.join(part or 'all' for part in run_key(run))}" for run in spare]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ledger.py", description="Finished runs against the published numbers of the ledger."
    )
    parser.add_argument("runs", nargs="+", help="run folders, or multirun / sweep folders holding them")
    parser.add_argument(
        "--ledger", type=Path, default=DEFAULT_LEDGER, help="the ledger CSV (docs/ledger.csv)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with user_errors():
        ledger = read_ledger(args.ledger)
        matches, unmatched, spare = match_runs(ledger, find_runs(args.runs))
        print(format_report(matches, unmatched, spare))
    return 0
