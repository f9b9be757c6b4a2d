"""Numbers a researcher can defend, end to end on the embedded model: intervals in metrics.json, fidelity to
the unpruned model (exact when every token is kept), seeds, `src/compare.py` (paired differences checked
against hand counts from the predictions, refusal of runs that differ), the multirun and sweep tables, and
the Pareto figure with one point per run."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from PIL import Image

from pipeline_fixtures import REPO, run_program
from pore.app import compare
from pore.app.comparison.paired import compare_pair
from pore.app.comparison.pareto import on_front
from pore.app.comparison.runs import load_result
from pore.app.sweeps import engine, leaderboard
from pore.app.sweeps.overrides import apply_overrides
from pore.app.sweeps.spec import load_spec
from pore.app.viz import comparison as figures
from pore.metrics import exact_match, normalize_exact
from pore.metrics.uncertainty import metric_intervals
from pore.stats.bootstrap import BootstrapSettings
from pore.stats.paired import jaccard, mcnemar_p_value

pytestmark = pytest.mark.transformers  # runs the pipeline: generate() with output_logits, the engine

COMMON = ("data.limit=12", "logger=none", "figures.enabled=false")
RUNS = {  # in order: `keep_all` reads `none` as its reference
    "none": ["strategy=none", "fidelity=true"],
    "keep_all": ["strategy=fastv", "strategy.keep=64", "fidelity=true", "fidelity_reference={root}/none"],
    "fastv": ["strategy=fastv", "strategy.keep=8", "fidelity=true"],
    "pore": ["strategy=pore_linear", "strategy.keep=8"],
    "random": ["strategy=random", "strategy.keep=8", "seeds=[0,1]"],
    "fewer": ["strategy=fastv", "strategy.keep=8", "data.limit=6"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("compare")
    outputs: dict[str, Any] = {"root": root}
    for name, args in RUNS.items():
        result = run_program(*COMMON, *(a.format(root=root) for a in args), f"output_dir={root / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = root / name
        outputs[f"{name}/stdout"] = result.stdout
    return outputs


def metrics_of(folder: Path) -> dict[str, float]:
    return json.loads((folder / "metrics.json").read_text())


def rows_of(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda row: row["question_id"])


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_every_metric_has_its_interval_in_metrics_json_and_the_summary(runs: dict[str, Any]) -> None:
    metrics = metrics_of(runs["fastv"])
    values = [
        k
        for k in metrics
        if k.startswith("spatial/") and not k.endswith(("samples", "failed", "ci_low", "ci_high"))
    ]
    assert "spatial/acc" in values and len(values) == 8  # acc, by region (3), by type (4)
    for key in values:
        assert metrics[f"{key}/ci_low"] <= metrics[key] <= metrics[f"{key}/ci_high"]
    assert (metrics["ci/resamples"], metrics["ci/seed"], metrics["ci/level"]) == (1000, 0, 0.95)
    # The same interval as resampling the saved predictions again (same seed, same draws).
    again = metric_intervals(load_result(runs["fastv"]).parts(), BootstrapSettings())
    assert (again["acc"].low, again["acc"].high) == (
        metrics["spatial/acc/ci_low"],
        metrics["spatial/acc/ci_high"],
    )
    line = next(line for line in runs["fastv/stdout"].splitlines() if line.startswith("spatial/acc "))
    assert f"[{metrics['spatial/acc/ci_low']:.4g}, {metrics['spatial/acc/ci_high']:.4g}]" in line
    assert "95 % bootstrap intervals" in runs["fastv/stdout"]


def test_fidelity_is_exact_when_every_token_is_kept(runs: dict[str, Any]) -> None:
    for name in ("none", "keep_all"):
        rows = rows_of(runs[name])
        assert [row["first_token_kl"] for row in rows] == [0.0] * 12
        assert all(row["first_token_top1"] is True for row in rows)
        metrics = metrics_of(runs[name])
        assert (metrics["fid/first_token_kl"], metrics["fid/first_token_top1"], metrics["fid/samples"]) == (
            0,
            1,
            12,
        )
    assert metrics_of(runs["keep_all"])["fid/answer_agreement"] == 1.0
    # Pruning to 8 of 64 tokens moves the distribution, and the measure sees it.
    pruned = rows_of(runs["fastv"])
    assert max(row["first_token_kl"] for row in pruned) > 1e-3
    assert metrics_of(runs["fastv"])["fid/first_token_kl"] == pytest.approx(
        np.mean([r["first_token_kl"] for r in pruned])
    )
    assert "fid/first_token_kl" not in metrics_of(runs["pore"])  # off by default: no extra forward


def test_a_stochastic_strategy_runs_once_per_seed(runs: dict[str, Any]) -> None:
    folder = runs["random"]
    summary = json.loads((folder / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1]
    per_seed = [metrics_of(folder / f"seed{seed}") for seed in (0, 1)]
    assert summary["metrics"]["spatial/acc"] == pytest.approx(np.mean([m["spatial/acc"] for m in per_seed]))
    assert summary["metrics"]["spatial/acc/seed_sd"] == pytest.approx(
        np.std([m["spatial/acc"] for m in per_seed], ddof=1)
    )
    kept = [[row["kept_visual_indices"] for row in rows_of(folder / f"seed{seed}")] for seed in (0, 1)]
    assert kept[0] != kept[1]  # another seed, another draw
    assert "| spatial/acc |" in (folder / "seeds.md").read_text()


def test_a_deterministic_strategy_ignores_seeds(tmp_path: Path) -> None:
    result = run_program(*COMMON, "strategy=fastv", "data.limit=2", "seeds=[0,1]", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "metrics.json").exists() and not list(tmp_path.glob("seed*"))


def test_compare_matches_hand_counts_from_the_predictions(runs: dict[str, Any]) -> None:
    first, second = rows_of(runs["fastv"]), rows_of(runs["pore"])
    right = [[exact_match(row["prediction"], row["answers"]) for row in rows] for rows in (first, second)]
    only_first = sum(a and not b for a, b in zip(*right, strict=True))
    only_second = sum(b and not a for a, b in zip(*right, strict=True))
    pair = compare_pair(load_result(runs["fastv"]), load_result(runs["pore"]), BootstrapSettings())
    acc = pair.differences["acc"]
    assert (acc.mcnemar.only_first, acc.mcnemar.only_second) == (only_first, only_second)
    assert acc.mcnemar.p_value == mcnemar_p_value(only_first, only_second)
    assert acc.difference.estimate == pytest.approx((sum(right[1]) - sum(right[0])) / 12)
    assert acc.difference.low <= acc.difference.estimate <= acc.difference.high
    same = [
        normalize_exact(a["prediction"]) == normalize_exact(b["prediction"])
        for a, b in zip(first, second, strict=True)
    ]
    assert pair.agreement.estimate == pytest.approx(np.mean(same))
    overlap = [
        jaccard(a["kept_visual_indices"], b["kept_visual_indices"])
        for a, b in zip(first, second, strict=True)
    ]
    assert pair.overlap.estimate == pytest.approx(np.mean(overlap))


def test_the_compare_command(
    runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = compare.main([str(runs["fastv"]), str(runs["pore"]), str(runs["none"]), "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0
    assert "## B against A" in text and "## C against A" in text
    assert "McNemar p (A only / B only)" in text and "agrees with unpruned" in text  # `none` is the reference
    assert "kept image tokens overlap (mean Jaccard)" in text
    assert (out / "compare.md").read_text() in text
    assert png_size(out / "kept_rows.png") == figures.KEPT_ROWS_SIZE


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        compare.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_compare_refuses_runs_that_differ(
    runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = refused([str(runs["fastv"]), str(runs["fewer"])], capsys)
    assert "answered different questions (12 vs 6; 6 only in the first, 0 only in the second" in message
    other = tmp_path / "llava_protocol"
    shutil.copytree(runs["pore"], other)
    identity = json.loads((other / "identity.json").read_text())
    identity["protocol"]["name"] = "llava"
    (other / "identity.json").write_text(json.dumps(identity))
    message = refused([str(runs["fastv"]), str(other)], capsys)
    assert "benchmark or protocol differs (protocol.name: 'default' vs 'llava')" in message
    assert "is not a finished run folder" in refused([str(runs["fastv"]), str(tmp_path)], capsys)
    assert "--resamples must be an integer >= 0" in refused([str(runs["fastv"]), "--resamples", "-1"], capsys)


def test_pareto_figure_has_one_point_per_run(
    runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    drawn: list[int] = []
    save = figures._save

    def counting_save(figure, path):
        drawn.append(sum(len(axes.containers) for axes in figure.axes))  # one error bar per point
        return save(figure, path)

    monkeypatch.setattr(figures, "_save", counting_save)
    folders = sorted(p.parent for p in Path(runs["root"]).rglob("predictions.jsonl"))
    assert len(folders) == 7  # none, keep_all, fastv, pore, fewer and the two seeds of random
    out = tmp_path / "pareto"
    assert compare.main(["--pareto", str(runs["root"]), "--out", str(out)]) == 0
    assert drawn == [7]
    assert png_size(out / "pareto.png") == figures.pareto_size(1, timed=False)
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert sorted(Path(row["output_dir"]) for row in rows) == folders
    for row in rows:
        assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"])
    # The most accurate of the cheapest runs, and the cheapest of the most accurate, are on the front.
    cheapest = min(float(row["prefill_tflops"]) for row in rows)
    best = max(float(row["value"]) for row in rows)
    cheap = max((r for r in rows if float(r["prefill_tflops"]) == cheapest), key=lambda r: float(r["value"]))
    accurate = min((r for r in rows if float(r["value"]) == best), key=lambda r: float(r["prefill_tflops"]))
    assert cheap["front_tflops"] == accurate["front_tflops"] == "True"
    assert "| benchmark | run | metric |" in capsys.readouterr().out

    # With a speed benchmark report of the same model: a second panel against the measured prefill time.
    report = {
        "model": {"name": "tiny_llava"},
        "comparisons": [
            {
                "batch": 1,
                "implementation": "sdpa",
                "strategy": "fastv",
                "budget": 8,
                "status": "ok",
                "prefill_ms": 2.0,
                "unpruned_ms": 5.0,
            },
            {
                "batch": 1,
                "implementation": "sdpa",
                "strategy": "pore_linear",
                "budget": 8,
                "status": "ok",
                "prefill_ms": 2.5,
                "unpruned_ms": 5.0,
            },
        ],
    }
    (tmp_path / "bench.json").write_text(json.dumps(report))
    timed = tmp_path / "timed"
    assert (
        compare.main(
            ["--pareto", str(runs["root"]), "--bench", str(tmp_path / "bench.json"), "--out", str(timed)]
        )
        == 0
    )
    assert png_size(timed / "pareto.png") == figures.pareto_size(1, timed=True)
    times = {
        Path(r["output_dir"]).name: r["prefill_ms"] for r in csv.DictReader((timed / "pareto.csv").open())
    }
    assert (times["fastv"], times["pore"], times["none"], times["keep_all"]) == ("2.0", "2.5", "5.0", "")


def test_the_pareto_figure_goes_to_wandb(
    runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "pareto"
    assert compare.main(["--pareto", str(runs["root"]), "--out", str(out), "--wandb"]) == 0
    offline = sorted((out / "wandb").glob("offline-run-*"))
    assert offline, "no offline W&B run"
    images = [p.name for p in (offline[-1] / "files" / "media" / "images").rglob("*.png")]
    assert any(name.startswith("pareto_") for name in images), images


def test_pareto_front_by_hand() -> None:
    values = [0.80, 0.85, 0.70, 0.90, 0.85]
    costs = [1.0, 2.0, 1.5, 3.0, 2.5]
    # 0.70 at 1.5 is beaten by 0.80 at 1.0; 0.85 at 2.5 by 0.85 at 2.0.
    assert on_front(values, costs) == [True, True, False, True, False]
    assert on_front([0.5, 0.6], [None, 1.0]) == [False, True]


def test_multirun_summary_compares_every_job_with_the_best(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_program(
        "--multirun",
        "strategy=none,fastv",
        "strategy.keep=8",
        *COMMON,
        f"hydra.sweep.dir={sweep}",
        f"output_dir={tmp_path}/job${{hydra:job.num}}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [row["overrides"] for row in rows] == ["strategy=none", "strategy=fastv"]
    for row in rows:
        assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"])
    best = max(rows, key=lambda row: float(row["value"]))
    other = next(row for row in rows if row is not best)
    assert best["differs_from_best"] == "best" and other["differs_from_best"] in ("yes", "no")
    assert float(other["vs_best"]) == pytest.approx(float(other["value"]) - float(best["value"]))
    assert float(rows[0]["agrees_with_unpruned"]) == 1.0 and 0 <= float(rows[1]["agrees_with_unpruned"]) <= 1
    assert png_size(sweep / "pareto.png") == figures.pareto_size(1, timed=False)
    assert (sweep / "pareto.md").read_text().count("\n") == 4  # header, rule, one row per job


def test_the_sweep_leaderboard_shows_intervals_and_the_paired_difference(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    spec, _ = apply_overrides(
        load_spec(REPO / "sweeps" / "strategy_grid.yaml"), ["strategy=fastv,pore_linear"]
    )
    space = engine.distributions(spec)
    trials = []
    for number, (name, strategy) in enumerate((("fastv", "fastv"), ("pore", "pore_linear"))):
        params = {"model": "llava15_7b", "data": "gqa", "strategy": strategy, "strategy.keep": 64}
        trial = optuna.trial.create_trial(
            params=params,
            distributions=space,
            value=0.0,
            user_attrs={leaderboard.OUTPUT_DIR: str(runs[name])},
        )
        trial.number = number
        trials.append(trial)
    entries = leaderboard.collect(trials, "acc")
    text = leaderboard.table(entries, spec, "acc", True, ["eff/prefill_tflops"], None)
    assert "interval  vs best (paired)" in text
    assert "best" in text and ("(tied)" in text or " *" in text)
    path = tmp_path / "board.csv"
    leaderboard.write_csv(path, entries, spec, "acc", True)
    rows = list(csv.DictReader(path.open()))
    verdicts = sorted(row["differs_from_best"] for row in rows)
    assert verdicts in (["best", "no"], ["best", "yes"])
    assert all(row["spatial/acc/ci_low"] for row in rows)


def test_bad_statistics_settings_fail_in_one_line_before_the_weights_load(tmp_path: Path) -> None:
    other = tmp_path / "other_benchmark"
    other.mkdir()
    (other / "predictions.jsonl").write_text("")
    (other / "config.yaml").write_text("data:\n  name: gqa\n")
    cases = {
        "bootstrap.level=2": "bootstrap.level must be a number between 0 and 1",
        f"fidelity_reference={other}": "ran data=gqa, this run data=spatial",
        f"fidelity_reference={tmp_path}/missing": "holds no predictions.jsonl",
        "seeds=[1,1]": "seeds must be a list of distinct integers",
    }
    for setting, fragment in cases.items():
        result = run_program(*COMMON, setting, f"output_dir={tmp_path / 'run'}")
        assert result.returncode == 2, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and fragment in last
        assert "Loading weights" not in result.stdout + result.stderr


def test_budget_study_pairs_each_prior_with_its_method() -> None:
    spec = importlib.util.spec_from_file_location("budget_study", REPO / "scripts" / "budget_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    ran = {
        "fastv": {"method": "fastv", "prior": {"name": "none"}},
        "fastv@1": {"method": "fastv", "prior": {"name": "none"}},
        "pore_linear": {"method": "fastv", "prior": {"name": "linear"}},
        "pore_linear@1": {"method": "fastv", "prior": {"name": "linear"}},
        "pdrop[strategy.positions=original]": {"method": "pdrop", "prior": {"name": "none"}},
        "pdrop": {"method": "pdrop", "prior": {"name": "none"}},
        "pore_pdrop_linear": {"method": "pdrop", "prior": {"name": "linear"}},
        "random": {"method": "random", "prior": {"name": "none"}},
    }
    names = list(ran)
    assert study.baseline_of("pore_linear", ran, names) == "fastv"
    assert study.baseline_of("pore_linear@1", ran, names) == "fastv@1"
    assert study.baseline_of("pore_pdrop_linear", ran, names) == "pdrop"
    assert study.baseline_of("fastv", ran, names) is None
