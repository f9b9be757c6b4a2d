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
from pore.app.evaluate import evaluate
from pore.app.identity import register_resolvers

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

SPLIT = 400  # the whole shipped test split: 100 questions of each type, top and bottom alike


def blind_accuracy() -> float:
    """What answering without the image scores: the most common answer of each question template."""
    from collections import Counter

    from pore.testing.spatial import generate

    train, test = generate("train", 4000), generate("test", SPLIT)

    def template(question: str) -> str:
        return " ".join(question.split()[:3])

    by_template: dict[str, Counter] = {}
    for row in train:
        by_template.setdefault(template(row["question"]), Counter())[row["answer"]] += 1
    guesses = {key: counts.most_common(1)[0][0] for key, counts in by_template.items()}
    return sum(guesses.get(template(r["question"])) == r["answer"] for r in test) / len(test)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)


def accuracy(tmp_path: Path, *overrides: str) -> dict[str, float]:
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["logger=none", f"output_dir={tmp_path / 'run'}", *overrides],
        )
    return evaluate(cfg)


def test_unpruned_model_reads_the_images(tmp_path: Path) -> None:
    """The shipped model must read the images: at least 85 % (89.5 % when trained; issue 4's target), far
    above answering blind (35 %)."""
    metrics = accuracy(tmp_path, "strategy=none")
    blind = blind_accuracy()
    assert metrics["spatial/samples"] == SPLIT
    assert 0.3 < blind < 0.5
    assert metrics["spatial/acc"] >= 0.85 and metrics["spatial/acc"] >= blind + 0.4


def test_random_pruning_to_an_eighth_costs_accuracy(tmp_path: Path) -> None:
    unpruned = accuracy(tmp_path / "none", "strategy=none")
    pruned = accuracy(tmp_path / "random", "strategy=random", "strategy.keep=8")
    assert pruned["eff/visual_tokens"] == 8
    assert pruned["spatial/acc"] <= unpruned["spatial/acc"] - 0.1


@pytest.mark.slow
def test_no_argument_run(tmp_path: Path) -> None:
    """`python src/run.py` with nothing else, in a fresh interpreter (the smoke test of the real program):
    the embedded model, benchmark and default strategy."""
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
