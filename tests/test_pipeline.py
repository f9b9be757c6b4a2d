"""End to end: `python src/run.py ...` on a tiny saved checkpoint and parquet benchmarks (offline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_fixtures import OFFLINE_ENV, REPO, RUN, run_cli, run_program, write_vqa_parquet
from pore.testing.tiny_llava import build_tiny_checkpoint

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-llava")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vqa_parquet(tmp_path_factory.mktemp("data") / "vqa", samples=24, corrupt=(5,))


def rows_of(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]


def common(checkpoint: Path, data: Path, output_dir: Path) -> list[str]:
    return [
        f"model.path={checkpoint}",
        "model.name=tiny",
        "data=vqav2",
        f"data.path={data}",
        "data.config=null",
        "data.split=test",
        "data.batch_size=4",
        "data.num_workers=0",
        f"output_dir={output_dir}",
        "strategy.keep=16",
    ]


def test_cli_run_writes_predictions_metrics_and_config(
    checkpoint: Path, benchmark: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = run_program(*common(checkpoint, benchmark, out), "strategy=pore_linear")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_of(out)
    assert sorted(int(r["question_id"]) for r in rows) == list(range(24))
    failed = [r for r in rows if r["error"] is not None]
    assert [r["question_id"] for r in failed] == ["5"] and "unreadable image" in failed[0]["error"]
    answered = [r for r in rows if r["error"] is None]
    for row in answered:
        assert row["prompt"].startswith("USER: <image>") and "single word or phrase" in row["prompt"]
        assert len(row["kept_visual_indices"]) == 16 == row["n_visual_tokens"]
        assert row["n_visual_tokens_before"] == 64
        assert isinstance(row["prediction"], str)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vqav2/samples"] == 23 and metrics["vqav2/failed"] == 1
    assert 0.0 <= metrics["vqav2/acc"] <= 1.0
    assert metrics["eff/visual_tokens"] == 16 and metrics["eff/visual_tokens_before"] == 64
    assert metrics["eff/prefill_tflops"] > 0 and metrics["eff/samples_per_sec"] > 0
    saved = (out / "config.yaml").read_text()
    assert "pore_linear" in saved and "keep: 16" in saved
    assert "vqav2/acc" in (out / "csv" / "metrics.csv").read_text()
    assert "vqav2/acc" in result.stdout  # the summary table


def test_unpruned_run_reports_null_kept_indices(checkpoint: Path, benchmark: Path, tmp_path: Path) -> None:
    out = tmp_path / "none"
    result = run_program(
        *common(checkpoint, benchmark, out),
        "strategy=none",
        "data.limit=6",
        "logger=none",
        "data.max_failed=0.2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in rows_of(out) if r["error"] is None]
    assert len(rows) == 5 and all(
        r["kept_visual_indices"] is None and r["n_visual_tokens"] == 64 for r in rows
    )


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process(
    checkpoint: Path, benchmark: Path, tmp_path: Path
) -> None:
    single, double = tmp_path / "single", tmp_path / "ddp"
    first = run_program(*common(checkpoint, benchmark, single), "strategy=fastv", "logger=none")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(
        *common(checkpoint, benchmark, double),
        "strategy=fastv",
        "logger=none",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "acc=" not in second.stdout + second.stderr  # rank 0's share is not the run's accuracy

    def comparable(rows: list[dict]) -> list[tuple]:
        return [(r["question_id"], r["prediction"], r["kept_visual_indices"], r["error"]) for r in rows]

    assert comparable(rows_of(double)) == comparable(rows_of(single))
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (single, double)]
    assert metrics[0]["vqav2/acc"] == metrics[1]["vqav2/acc"]
    assert metrics[0]["vqav2/samples"] == metrics[1]["vqav2/samples"] == 23
    assert not list(double.glob("predictions.rank*.jsonl"))


@pytest.mark.slow
def test_interrupted_run_resumes_with_every_sample_once(checkpoint: Path, tmp_path: Path) -> None:
    data = write_vqa_parquet(tmp_path / "big", samples=120)
    out = tmp_path / "resumed"
    overrides = [
        *common(checkpoint, data, out),
        "strategy=pore_exponential",
        "data.batch_size=2",
        "logger=none",
    ]
    env = {**os.environ, **OFFLINE_ENV}
    process = subprocess.Popen(
        [sys.executable, str(RUN), *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rank_file = out / "predictions.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if rank_file.exists() and len(rank_file.read_text().splitlines()) >= 20:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert not (out / "predictions.jsonl").exists()
    done_before = len(rank_file.read_text().splitlines())
    assert 20 <= done_before < 120
    with rank_file.open("a") as handle:  # a row torn in the middle of a write
        handle.write('{"question_id": "119", "predic')

    result = run_program(*overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{done_before} questions already answered" in result.stdout + result.stderr
    ids = [int(r["question_id"]) for r in rows_of(out)]
    assert sorted(ids) == list(range(120))  # none lost, none twice
    assert json.loads((out / "metrics.json").read_text())["vqav2/samples"] == 120


def test_rerun_with_other_settings_in_the_same_folder_is_refused(
    checkpoint: Path, benchmark: Path, tmp_path: Path
) -> None:
    out = tmp_path / "clash"
    assert run_program(*common(checkpoint, benchmark, out), "data.limit=2", "logger=none").returncode == 0
    result = run_program(
        *common(checkpoint, benchmark, out), "data.limit=2", "logger=none", "strategy.keep=8"
    )
    assert result.returncode == 2
    assert "holds a run with other settings (strategy.keep: 16 -> 8)" in result.stderr


def test_wandb_offline_run_keeps_the_final_metrics(checkpoint: Path, benchmark: Path, tmp_path: Path) -> None:
    out = tmp_path / "wandb"
    # 1 of the 8 images is corrupt: more than the default data.max_failed share of 5 %.
    result = run_program(
        *common(checkpoint, benchmark, out), "logger=wandb", "data.limit=8", "data.max_failed=0.2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = list(out.glob("wandb/offline-run-*/files/metrics.json"))
    assert len(summaries) == 1 and not summaries[0].is_symlink()
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))
    summary = json.loads(summaries[0].read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["vqav2/acc"] == pytest.approx(metrics["vqav2/acc"])
    assert summary["eff/visual_tokens"] == 16


def test_unknown_names_and_missing_columns_fail_clearly(
    checkpoint: Path, benchmark: Path, tmp_path: Path
) -> None:
    unknown = run_program("strategy=pore_quadratic")
    assert unknown.returncode == 2
    assert (
        "pore_linear" in unknown.stderr
        and "unknown strategy 'pore_quadratic'; choose one of:" in unknown.stderr
    )
    missing = run_program(*common(checkpoint, benchmark, tmp_path / "x"), "+data.columns.question=prompt")
    assert missing.returncode != 0
    assert "the data has no question (column 'prompt')" in missing.stderr
    assert "+data.columns.question=<column>" in missing.stderr
    too_many = run_program(*common(checkpoint, benchmark, tmp_path / "y"), "strategy.keep=65", "logger=none")
    assert too_many.returncode != 0 and "keep <= 64" in too_many.stderr
