"""A run a user can trust: bad settings fail before the weights load with one line (exit 2), one writer per
run folder, a failed run does not own its folder and leaves a finished one byte-identical, too many failed
samples fail the run, reruns keep their numbers, sweeps end with a table, a benchmark that fails a setting
exits non-zero and warns when its ratios are noise. Real CLI (`python src/run.py`, `src/bench.py`) on the
shipped tiny model and small parquet files, offline."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import OFFLINE_ENV, REPO, RUN, run_cli, run_program, write_vqa_parquet
from pore import build_strategy
from pore.adapters import ModelFacts
from pore.app.evaluation.lock import LOCK_NAME
from pore.app.evaluation.progress import batches_for, shown_postfix
from pore.errors import UserError, user_errors

CALIBRATION = REPO / "assets" / "calibration" / "tiny_llava" / "spatial" / "layer2.json"


def llava_facts(layers: int) -> ModelFacts:
    return ModelFacts("llava", layers, pads_to_square=True)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vqa_parquet(tmp_path_factory.mktemp("data") / "vqa", samples=12)


def vqa_args(data: Path, output_dir: Path, *more: str) -> list[str]:
    return [
        "data=vqav2",
        f"data.path={data}",
        "data.config=null",
        "data.split=test",
        "data.batch_size=4",
        "logger=none",
        "figures.enabled=false",
        f"output_dir={output_dir}",
        *more,
    ]


def spatial_args(output_dir: Path, *more: str) -> list[str]:
    return ["data.limit=4", "logger=none", "figures.enabled=false", f"output_dir={output_dir}", *more]


def assert_one_line_user_error(result: subprocess.CompletedProcess, fragment: str) -> str:
    """Exit status 2, `error: ...` as the last line, no traceback, and the weights never loaded."""
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Loading weights" not in result.stdout + result.stderr  # checked before the model loads
    return last


# ------------------------------------------------------------------------------- checks before the weights


def empty_parquet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("answers", pa.list_(pa.string())),
            ("image", image),
        ]
    )
    pq.write_table(schema.empty_table(), folder / "test-00000-of-00001.parquet")
    return folder


def test_user_errors_are_one_line_before_the_weights_load(vqa: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.json"
    truncated.write_text(CALIBRATION.read_text()[:300])
    incomplete = tmp_path / "incomplete.json"
    data = json.loads(CALIBRATION.read_text())
    for bucket in data["buckets"].values():
        bucket.pop("profile2d")
    incomplete.write_text(json.dumps(data))
    empty = empty_parquet(tmp_path / "empty")
    out = tmp_path / "out"
    cases = [
        (
            spatial_args(out, "strategy.keep=100"),
            "strategy.keep=100 is larger than the 64 prunable image tokens of an image of this model; "
            "use keep <= 64, or strategy.ratio for a share of each image",
        ),
        (
            spatial_args(out, "strategy.keep=abc"),
            "strategy.keep must be a positive integer (or a list of them, one per stage), got 'abc'",
        ),
        (spatial_args(out, "strategy.kep=5"), "unknown setting strategy.kep (did you mean strategy.keep?)"),
        (spatial_args(out, "+strategy.kep=5"), "unknown strategy settings ['kep'] (did you mean keep?)"),
        (
            spatial_args(out, "strategy.layer=9"),
            "strategy.layer must be in [1, 3] for this 4-layer language model",
        ),
        (
            vqa_args(vqa, out, "+data.columns.question=prompt"),
            "the data has no question (column 'prompt')",
        ),
        (
            spatial_args(out, f"data.path={tmp_path / 'nowhere'}"),
            f"data.path '{tmp_path / 'nowhere'}' is neither a local folder nor a hub id (owner/name)",
        ),
        (
            vqa_args(empty, out),
            f"data.path '{empty}' (config None, split 'test') has no rows (an empty parquet file?)",
        ),
        (
            spatial_args(out, "strategy=pore_calibrated", f"strategy.prior.path={truncated}"),
            f"prior file {truncated} is not valid JSON (",
        ),
        (
            spatial_args(out, "strategy=pore_calibrated", f"strategy.prior.path={incomplete}"),
            f"prior file {incomplete} is incomplete (missing or malformed 'profile2d'); measure it again",
        ),
        (spatial_args(out, "logger.kind=tensorboard"), "unknown logger.kind 'tensorboard'"),
        (
            spatial_args(out, "max_new_tokens=abc"),
            "max_new_tokens must be an integer >= 1 (or null: the protocol's), got 'abc'",
        ),
        (
            spatial_args(out, "model.path=/nowhere/model"),
            "model.path '/nowhere/model' is not a local checkpoint folder nor a hub id (owner/name)",
        ),
    ]
    for overrides, fragment in cases:
        assert_one_line_user_error(run_program(*overrides), fragment)
    assert not (out / "config.yaml").exists()  # nothing of a refused run is kept


def test_only_user_errors_are_shortened(capsys: pytest.CaptureFixture[str]) -> None:
    """A UserError is one line and status 2; anything else (a bug) keeps its exception and traceback."""
    with pytest.raises(SystemExit) as exited, user_errors():
        raise UserError("strategy.keep must be a positive integer")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: strategy.keep must be a positive integer\n"
    with pytest.raises(KeyError), user_errors():
        raise KeyError("a bug")


# ------------------------------------------------------------------------------------ presets that fit


def test_pyramiddrop_presets_scale_their_stages_to_the_model_depth() -> None:
    pdrop = build_strategy("pdrop")
    assert pdrop.layers == (8, 16, 24) and pdrop.reference_depth == 32
    assert pdrop.resolve(llava_facts(32)).layers == (8, 16, 24)
    assert pdrop.resolve(llava_facts(40)).layers == (10, 20, 30)
    assert pdrop.resolve(llava_facts(28)).layers == (7, 14, 21)
    assert build_strategy("pore_pdrop_linear").resolve(llava_facts(4)).layers == (1, 2, 3)
    assert pdrop.replace(reference_depth=None).resolve(llava_facts(40)).layers == (8, 16, 24)
    # Layers given for a model (Python, or strategy.layer on the command line) are that model's own.
    assert build_strategy("pdrop", layer=[1, 2, 3]).resolve(llava_facts(4)).layers == (1, 2, 3)
    with pytest.raises(ValueError) as caught:
        pdrop.resolve(llava_facts(3))
    assert str(caught.value) == (
        "strategy.layer=[8, 16, 24] (written for a 32-layer language model) does not scale to this 3-layer "
        "model (it gives [1, 2, 2]); set increasing layers in [1, 2], this model has room for at most 2 "
        "stages: give fewer layers, keeps and ratios"
    )


def test_pdrop_runs_on_the_four_layer_embedded_model(tmp_path: Path) -> None:
    out = tmp_path / "pdrop"
    result = run_program(*spatial_args(out, "strategy=pdrop", "data.limit=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pruning before layers [1, 2, 3] of this 4-layer model" in result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["n_visual_tokens"] for row in rows] == [8, 8]  # 12.5 % of 64 after the last stage


# ------------------------------------------------------------------------------ one writer per folder


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    overrides = spatial_args(out, "data.limit=40", "data.batch_size=1", "strategy.keep=16")
    env = {**os.environ, **OFFLINE_ENV}
    first = subprocess.Popen(
        [sys.executable, str(RUN), *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None and not (out / "predictions.rank0.jsonl").exists():
        time.sleep(0.05)
    # Paused (alive, holding its lock) while the second starts, so that the test does not race its speed.
    first.send_signal(signal.SIGSTOP)
    assert first.poll() is None, "the first run ended before the second started"
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    try:
        second = run_cli(*overrides)
    finally:
        first.send_signal(signal.SIGCONT)
    message = assert_one_line_user_error(second, f"{out} is in use by another run (pid {first.pid} on ")
    assert message.endswith(
        f"wait for it to finish or choose another output_dir (delete {out / LOCK_NAME} only "
        "if that run is gone)"
    )
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    ids = [json.loads(line)["question_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 40  # every sample once
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    result = run_program(*spatial_args(out, "data.limit=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------- folders, reruns and their numbers


def test_a_run_that_failed_on_a_bad_setting_does_not_own_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "fixed"
    bad = run_program(*spatial_args(out, "data.limit=2", "strategy.keep=100"))
    assert bad.returncode == 2
    # A folder with a stored config but no answered question (e.g. a run that crashed at once) is free too.
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text("strategy:\n  keep: 100\n")
    fixed = run_program(*spatial_args(out, "data.limit=2", "strategy.keep=16"))
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "keep: 16" in (out / "config.yaml").read_text()


def test_a_folder_with_answers_names_the_settings_that_differ(tmp_path: Path) -> None:
    out = tmp_path / "clash"
    assert run_program(*spatial_args(out, "data.limit=2", "strategy.keep=16")).returncode == 0
    other = run_program(*spatial_args(out, "data.limit=2", "strategy.keep=8", "strategy.prior.alpha=0.3"))
    message = assert_one_line_user_error(other, f"{out} holds a run with other settings (")
    assert "strategy.keep: 16 -> 8; strategy.prior.alpha: 0.6 -> 0.3" in message
    assert message.endswith("choose another output_dir, or delete that folder to start over")
    assert "'name'" not in message  # the keys that differ, not both dicts


def test_rerunning_a_finished_run_keeps_its_efficiency_numbers(tmp_path: Path) -> None:
    out = tmp_path / "again"
    assert run_program(*spatial_args(out, "data.limit=4")).returncode == 0
    before = json.loads((out / "metrics.json").read_text())
    assert before["eff/samples_per_sec"] > 0
    again = run_program(*spatial_args(out, "data.limit=4"))
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads((out / "metrics.json").read_text())
    assert after == before  # nothing answered again: the first run's throughput stays


# ------------------------------------------------------------------------------ sweeps and progress


def test_multirun_ends_with_one_table_of_every_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_program(
        "--multirun",
        "strategy.keep=8,16",
        "data.limit=2",
        "logger=none",
        "figures.enabled=false",
        f"hydra.sweep.dir={sweep}",
        f"output_dir={tmp_path}/job${{hydra:job.num}}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["overrides"] for row in rows] == ["strategy.keep=8", "strategy.keep=16"]
    assert all(row["status"] == "ok" and row["metric"] == "spatial/acc" for row in rows)
    assert [float(row["eff/visual_tokens"]) for row in rows] == [8.0, 16.0]
    assert float(rows[0]["eff/samples_per_sec"]) > 0
    assert "| job | overrides | status | metric |" in result.stdout
    assert (sweep / "summary.md").read_text().count("\n") == 4


def test_multirun_with_a_bad_job_shows_it_in_the_table_and_exits_2(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_program(
        "--multirun",
        "strategy.keep=16,100",
        "data.limit=2",
        "logger=none",
        "figures.enabled=false",
        f"hydra.sweep.dir={sweep}",
        f"output_dir={tmp_path}/job${{hydra:job.num}}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    with (sweep / "summary.csv").open() as handle:
        statuses = [row["status"] for row in csv.DictReader(handle)]
    assert statuses[0] == "ok" and statuses[1].startswith("failed: strategy.keep=100 is larger than the 64")
    assert "1 of 2 jobs failed" in result.stdout


def test_progress_bar_has_a_total(tmp_path: Path) -> None:
    result = run_program(*spatial_args(tmp_path / "bar", "data.limit=6", "data.batch_size=2"))
    assert result.returncode == 0
    assert "3/3 [" in result.stdout  # batches of this run, with elapsed and remaining time
    assert batches_for(None, 0, 1, 4) is None
    assert batches_for(400, 100, 2, 16) == 10  # 300 left over 2 ranks = 150 each, in batches of 16


# -------------------------------------------------------------------------------------------- bench


BENCH_ARGS = [
    "model=tiny_llava",
    "bench.batch_sizes=[2]",
    "bench.budgets=[64,16]",
    "bench.warmup=0",
    "bench.repeats=1",
    "bench.instrumented_repeats=0",
    "bench.generate_repeats=1",
    "bench.new_tokens=2",
    "bench.include_eager_fastv=false",
    "bench.strategies=[fastv]",
]


def test_a_benchmark_setting_that_fails_is_listed_and_the_command_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `index 1 is out of bounds` in the ideal's generation under transformers 5.24 (its decoder gets the
    cache as `cache=`, which the reducer did not read): here the ideal's scoring-free index raises."""
    from pore.app.bench.reduce import IdealReducer

    def select(self: IdealReducer, hidden: object, kwargs: object) -> None:
        raise RuntimeError("index 1 is out of bounds for dimension 1 with size 1")

    output = tmp_path / "bench.json"
    with monkeypatch.context() as patched:
        patched.setattr(IdealReducer, "select", select)
        result = run_program(*BENCH_ARGS, f"bench.output={output}", program="bench")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        "error: 1 of 3 benchmark settings failed (their rows say 'error'; the rest of "
        f"{output} is valid):\n  batch=2 sdpa ideal keep=16 (prefill): RuntimeError: index 1 is out of bounds"
    ) in result.stderr
    records = {r["approach"]: r for r in json.loads(output.read_text())["results"]}
    assert records["ideal"]["status"] == "error" and records["pruned"]["status"] == "ok"
    clean = run_program(*BENCH_ARGS, f"bench.output={tmp_path / 'clean.json'}", program="bench")
    assert clean.returncode == 0, clean.stderr[-3000:]


def test_benchmark_settings_that_cannot_work_are_refused_before_the_model_is_built(tmp_path: Path) -> None:
    cases = [
        (
            ["bench.budgets=[576,128]"],
            "error: bench.budgets=[576, 128]: none is below the 64 image tokens of tiny-llava, so nothing "
            "pruned would be measured; e.g. bench.budgets=[64,16]",
        ),
        (
            ["bench.budgets=[64,16]", "bench.layer=7"],
            "error: bench.layer must be in 1..3 for this 4-layer model",
        ),
        (
            ["bench.budgets=[64,16]", "bench.strategies=[pdrop]"],
            "error: bench.strategies: 'pdrop' cannot prune before the one layer bench.layer=2",
        ),
    ]
    for args, message in cases:
        result = run_program("model=tiny_llava", *args, program="bench")
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), (
            result.stderr[-2000:]
        )
        assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------- a finished run is left alone


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_failed_rerun_leaves_a_finished_run_byte_identical(tmp_path: Path) -> None:
    """Hydra writes nothing into output_dir; the run writes its files (config.yaml, .hydra/, run.log) once
    it holds the lock and has loaded its model: a rerun that fails before that changes no byte."""
    out = tmp_path / "finished"
    first = run_program(*spatial_args(out, "strategy.keep=16"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    assert {
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
        "config.yaml",
        "run.log",
    } <= set(before)
    log = (out / "run.log").read_text()
    assert "INFO pore: evaluating tiny_llava on spatial (4 questions) with strategy pore_linear" in log
    assert "spatial/acc" in log  # the summary table
    assert "strategy.keep=16" in (out / ".hydra" / "overrides.yaml").read_text()
    failing = [
        ["seed=abc"],  # refused before the lock
        ["strategy.keep=100"],  # refused by the strategy check
        ["strategy.keep=8"],  # refused after the lock: the folder holds answers of other settings
        ["trainer.devices=0"],
        *(
            [["trainer.accelerator=gpu"], ["model.attn_implementation=flash_attention_2"]]
            if not gpu()
            else []
        ),
    ]
    for mistake in failing:
        result = run_program(*spatial_args(out, "strategy.keep=16"), *mistake)
        assert result.returncode == 2, (mistake, result.stderr[-2000:])
        assert snapshot(out) == before, mistake
    again = run_program(*spatial_args(out, "strategy.keep=16"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "run.log").read_text().startswith(log)  # a rerun appends its own log
    assert (out / "config.yaml").read_bytes() == before["config.yaml"]


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def test_more_failed_samples_than_data_max_failed_fail_the_run(vqa: Path, tmp_path: Path) -> None:
    corrupt = write_vqa_parquet(tmp_path / "two-bad", samples=12, corrupt=(3, 7))
    out = tmp_path / "too-many"
    result = run_program(*vqa_args(corrupt, out))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: 2 of 12 samples failed, more than data.max_failed=0.05 of them (first errors: 3: unreadable "
        "image: UnidentifiedImageError: cannot identify image file; 7: unreadable image"
    )
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 12  # the rows stay
    assert json.loads((out / "metrics.json").read_text())["vqav2/failed"] == 2
    allowed = run_program(*vqa_args(corrupt, tmp_path / "allowed", "data.max_failed=0.2"))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    clean = run_program(*vqa_args(vqa, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]


# ------------------------------------------------------------------------------- what the console shows


def test_the_bar_shows_a_running_figure_only_for_the_whole_run() -> None:
    assert shown_postfix({"acc": "92.0", "failed": "1"}, world_size=1) == {"acc": "92.0", "failed": "1"}
    assert shown_postfix({"acc": "92.0"}, world_size=2) == {}  # rank 0's share is not the run's


def test_lightnings_irrelevant_messages_are_filtered(tmp_path: Path) -> None:
    """The litlogger tip, the pytree FutureWarning and the batch-indices warning; its other messages stay."""
    import logging
    import warnings

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = Keep()
    lightning_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_program(*spatial_args(tmp_path / "quiet", "logger=csv"))
    finally:
        lightning_log.removeHandler(handler)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = [record.getMessage() for record in records]
    assert any(message.startswith("GPU available") for message in messages)  # the others still come
    assert not any("Tip" in message for message in messages)
    shown = [str(warning.message) for warning in caught]
    assert not any("LeafSpec" in text or "Couldn't infer the batch indices" in text for text in shown), shown


def test_the_bench_warns_when_its_spread_is_larger_than_its_effect() -> None:
    """A made-up report: the ratios of batch 1 are inside the spread of their timings, those of batch 8 are
    not."""
    from pore.app.bench.noise import spread_warning
    from pore.app.bench.report import comparisons

    def record(batch: int, approach: str, median: float, p10: float, p90: float, **more: object) -> dict:
        budget = more.pop("budget", 64)
        return {
            "batch": batch,
            "implementation": "sdpa",
            "approach": approach,
            "budget": budget,
            "strategy": more.pop("strategy", None),
            "status": "ok",
            "prefill_ms": {"median": median, "p10": p10, "p90": p90},
        }

    noisy = [
        record(1, "unpruned", 22.0, 8.8, 61.7),
        record(1, "ideal", 20.0, 9.0, 300.0, budget=16),
        record(1, "pruned", 29.1, 10.5, 311.5, budget=16, strategy="fastv"),
    ]
    stable = [
        record(8, "unpruned", 100.0, 98.0, 102.0),
        record(8, "ideal", 40.0, 39.0, 41.0, budget=16),
        record(8, "pruned", 41.0, 40.0, 42.0, budget=16, strategy="fastv"),
    ]
    assert spread_warning(stable, comparisons(stable)) is None
    warning = spread_warning(noisy + stable, comparisons(noisy + stable))
    assert warning is not None and warning.startswith(
        "in 1 of 2 settings the timings spread (p10-p90) more than the effect they report (e.g. batch 1 sdpa "
        "fastv keep 16: speed-up 0.76x within a "
    )
    assert "ideal speed-up 1.10x within a 1455 % spread" in warning
    for advice in ("OMP_NUM_THREADS=1", "bench.repeats=30", "bench.architecture=llava15_small"):
        assert advice in warning
