"""The shipped model on the shipped benchmark: real accuracy, and the no-argument run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline_fixtures import OFFLINE_ENV, REPO, RUN
from pore.config import register_resolvers
from pore.evaluate import evaluate

SUBSET = 128  # the first 128 questions of the shipped test split: 32 of each type, top and bottom alike


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)


def accuracy(tmp_path: Path, *overrides: str) -> dict[str, float]:
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["logger=none", f"data.limit={SUBSET}", f"output_dir={tmp_path / 'run'}", *overrides],
        )
    return evaluate(cfg)


def test_unpruned_model_answers_the_spatial_questions(tmp_path: Path) -> None:
    metrics = accuracy(tmp_path, "strategy=none")
    assert metrics["spatial/samples"] == SUBSET
    assert metrics["spatial/acc"] >= 0.85
    assert metrics["spatial/acc_top"] >= 0.8 and metrics["spatial/acc_bottom"] >= 0.8


def test_random_pruning_to_an_eighth_costs_accuracy(tmp_path: Path) -> None:
    unpruned = accuracy(tmp_path / "none", "strategy=none")
    pruned = accuracy(tmp_path / "random", "strategy=random", "strategy.keep=8")
    assert pruned["eff/visual_tokens"] == 8
    assert pruned["spatial/acc"] <= unpruned["spatial/acc"] - 0.1


def test_no_argument_run(tmp_path: Path) -> None:
    """`python src/run.py` with nothing else: the embedded model, benchmark and default strategy."""
    result = subprocess.run(
        [sys.executable, str(RUN)],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spatial/acc" in result.stdout and "eff/visual_tokens" in result.stdout
    (metrics_file,) = (tmp_path / "outputs").glob("tiny_llava/spatial/pore_linear-*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["spatial/samples"] == 400 and metrics["eff/visual_tokens"] == 16
