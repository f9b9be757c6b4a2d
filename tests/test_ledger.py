"""The ledger of published numbers (docs/ledger.csv) and `src/ledger.py`, on runs of the embedded model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline_fixtures import run_program
from pore.app import ledger

pytestmark = pytest.mark.transformers  # runs the pipeline on the embedded model

COMMON = ("data.limit=6", "logger=none", "figures.enabled=false")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multirun-like folder with an unpruned run and a FastV run (keep 8) on the embedded model."""
    root = tmp_path_factory.mktemp("ledger")
    for name, args in {"none": ["strategy=none"], "fastv": ["strategy=fastv", "strategy.keep=8"]}.items():
        result = run_program(*COMMON, *args, f"output_dir={root / name}")
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def write_ledger(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        handle.write("# a comment line\n")
        writer = csv.DictWriter(handle, fieldnames=ledger.COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in ledger.COLUMNS})
    return path


def row(strategy: str, budget: str, value: float, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny_llava",
        "strategy": strategy,
        "budget": budget,
        "benchmark": "spatial",
        "protocol": "default",
        "metric": "spatial/acc",
        "scale": 100,
        "value": value,
        "method": strategy,
        "paper": "test paper",
        "table": "Table 1",
        "checkpoint": "embedded",
        **extra,
    }


def test_runs_are_matched_by_model_strategy_budget_benchmark_and_protocol(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_ledger(
        tmp_path / "ledger.csv",
        [
            row("none", "", 50.0),
            row("fastv", "8", 40.0),
            row("fastv", "16", 45.0),  # no run kept 16 tokens
            row("none", "", 70.0, protocol="llava"),  # no run under protocol=llava
        ],
    )
    assert ledger.main([str(runs), "--ledger", str(path)]) == 0
    out = capsys.readouterr().out
    for name, paper in (("none", 50.0), ("fastv", 40.0)):
        measured = json.loads((runs / name / "metrics.json").read_text())["spatial/acc"] * 100
        budget = "8" if name == "fastv" else "all"
        line = next(text for text in out.splitlines() if f"| {name} | {budget} |" in text)
        assert f"| {paper:.2f} | {measured:.2f} | {measured - paper:+.2f} |" in line
        assert str(runs / name) in line
    assert "ledger rows without a run (2):" in out
    assert "- tiny_llava, fastv, budget 16, spatial, default: 45 (test paper, Table 1)" in out
    assert "- tiny_llava, none, budget all, spatial, llava: 70" in out
    assert "runs without a ledger row (0):" in out


def test_a_run_without_a_row_and_the_headline_metric(runs: Path, tmp_path: Path) -> None:
    """An empty `metric` reads the benchmark's headline; a run no row names is listed."""
    path = write_ledger(tmp_path / "ledger.csv", [row("none", "", 10.0, metric="")])
    matches, unmatched, spare = ledger.match_runs(ledger.read_ledger(path), ledger.find_runs([runs]))
    headline = json.loads((runs / "none" / "metrics.json").read_text())["spatial/acc"]
    assert [(m.run.path.name, m.measured) for m in matches] == [("none", pytest.approx(headline * 100))]
    assert unmatched == [] and [run.path.name for run in spare] == ["fastv"]


def test_bad_ledgers_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_ledger(tmp_path / "bad.csv", [row("none", "", "high")])  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as exit:
        ledger.main([str(tmp_path), "--ledger", str(bad)])
    assert exit.value.code == 2
    assert f"error: {bad}:3: column 'value' must be a number, got 'high'" in capsys.readouterr().err
    (tmp_path / "short.csv").write_text("model,value\nx,1\n")
    with pytest.raises(SystemExit):
        ledger.main([str(tmp_path), "--ledger", str(tmp_path / "short.csv")])
    assert "missing: strategy, budget, benchmark, protocol, metric" in capsys.readouterr().err


def test_the_shipped_ledger_reads_and_cites_its_sources() -> None:
    rows = ledger.read_ledger(ledger.DEFAULT_LEDGER)
    assert len(rows) >= 14
    assert all(r.paper and r.table and r.checkpoint for r in rows)
    unpruned = {r.benchmark: r.value for r in rows if r.strategy == "none" and r.benchmark != "average10"}
    assert unpruned == {
        "vqav2": 78.5,
        "gqa": 62.0,
        "scienceqa_img": 66.8,
        "textvqa": 58.2,
        "pope": 85.9,
        "mme": 1510.7,
        "mmbench": 64.3,
    }
    averages = {(r.strategy, r.value) for r in rows if r.benchmark == "average10"}
    assert averages == {
        ("none", 63.1),
        ("fastv", 59.6),
        ("pore_authors_fastv", 62.5),
        ("pdrop", 60.5),
        ("pore_authors_pdrop", 61.6),
        ("sparsevlm_128", 62.0),
        ("pore_authors_sparsevlm", 62.4),
    }
