"""Sweeps: the W&B sweep files in `sweeps/` and the offline runner (`python src/sweep.py`), with real Optuna.

The shipped files are parsed, every parameter set the engine proposes for them is composed with Hydra's
compose API against `conf/` and validated as the run would; their metric names are keys that
`pore.app.evaluation.report` writes. An offline sweep runs `src/run.py` on the embedded tiny model in
subprocesses, is killed (SIGKILL of the runner's process group) while a trial runs, resumes, and ends with
every parameter set exactly once, ranked by the metric read from the runs' metrics.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from pipeline_fixtures import OFFLINE_ENV, REPO
from pore.app.sweeps import engine, leaderboard
from pore.app.sweeps.command import agent_args, build_command
from pore.app.sweeps.overrides import LOGISTICS, apply_overrides, dedupe
from pore.app.sweeps.runner import Options, Runner, identity
from pore.app.sweeps.spec import SweepSpec, SweepSpecError, load_spec, parse_spec
from pore.app.sweeps.state import SweepDir, SweepStateError
from pore.app.sweeps.validate import composer

SWEEP = REPO / "src" / "sweep.py"
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
CALIBRATED_CONF = REPO / "conf" / "strategy" / "pore_calibrated.yaml"
CALIBRATION = REPO / "assets" / "calibration" / "tiny_llava" / "spatial"  # layer<K>.json, K = 1, 2, 3
BUDGETS = {192, 128, 64}  # of LLaVA-1.5's 576 image tokens, as issue 8 asks


def env() -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV}


@pytest.fixture
def sweep_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Any:
    """`sweep_main(*args)` -> (exit status, stdout): the CLI in this process (no second start-up of torch);
    its trials still run as subprocesses, offline."""
    from pore.app.sweeps.cli import main

    monkeypatch.chdir(REPO)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        status = main(list(args))
        return status, capsys.readouterr().out

    return run


def needs_calibrated(path: Path) -> None:
    if path.stem == "calibrated_priors" and not CALIBRATED_CONF.exists():
        pytest.skip("conf/strategy/pore_calibrated.yaml does not exist yet (calibrated priors not merged)")


def shipped(path: Path) -> SweepSpec:
    """A shipped sweep file; the calibrated one reads the embedded model's calibration (the strategy's
    validation reads the prior file, and LLaVA-1.5's calibration is not in the repository)."""
    spec = load_spec(path)
    if path.stem == "calibrated_priors":
        assert str(spec.parameters["strategy.prior.path"].values[0]).startswith(
            "outputs/calibration/llava15_7b/"
        )
        spec, _ = apply_overrides(spec, [f"strategy.prior.path={CALIBRATION}"])
    return spec


def minimal(**changes: Any) -> dict[str, Any]:
    raw = {
        "method": "grid",
        "program": "src/run.py",
        "parameters": {"strategy.keep": {"values": [8, 16]}},
        "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"],
    }
    raw.update(changes)
    return raw


# -- the shipped sweep files --------------------------------------------------------------------------------


def test_the_shipped_sweep_files_exist() -> None:
    assert {p.stem for p in SWEEP_FILES} >= {"strategy_grid", "prior_bayes", "calibrated_priors"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_sweep_file_is_valid_and_says_what_it_answers(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#") and "?" in text.split("\nname:")[0], "a comment on top asks the question"
    spec = load_spec(path)
    assert (REPO / spec.program).exists()
    assert "${args_no_hyphens}" in spec.command
    assert "logger=wandb" in spec.command and "logger.mode=online" in spec.command
    keeps = spec.parameters.get("strategy.keep")
    assert keeps is not None and set(keeps.grid_values()) <= BUDGETS
    if spec.method == "bayes":
        assert spec.metric is not None and spec.metric.goal == "maximize"
    assert not spec.notes, spec.notes  # nothing in the files is silently ignored


def test_the_grid_crosses_strategies_budgets_and_benchmarks() -> None:
    spec = load_spec(REPO / "sweeps" / "strategy_grid.yaml")
    assert spec.method == "grid"
    assert {"fastv", "pore_linear", "pore_exponential", "random"} <= set(spec.parameters["strategy"].values)
    assert set(spec.parameters["strategy.keep"].values) == BUDGETS
    assert len(spec.parameters["data"].values) >= 2
    assert len(spec.grid()) == len(engine.propose(spec, len(spec.grid())))


def test_the_bayes_search_covers_the_prior_and_the_layer_at_a_fixed_budget() -> None:
    spec = load_spec(REPO / "sweeps" / "prior_bayes.yaml")
    assert spec.method == "bayes" and spec.parameters["strategy.keep"].is_fixed
    for name in ("strategy.prior.alpha", "strategy.prior.sigma", "strategy.prior.position", "strategy.layer"):
        assert not spec.parameters[name].is_fixed, name


def proposals(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every grid combination; 30 bayes / random proposals (TPE past its random start-up phase)."""
    count = len(spec.grid()) if spec.method == "grid" else 30
    found = engine.propose(spec, count, seed=0)
    return [{name: params[name] for name in spec.parameters} for params in found]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_every_proposed_parameter_set_composes_into_a_valid_config(path: Path, tmp_path: Path) -> None:
    needs_calibrated(path)
    spec = shipped(path)
    runner = Runner(spec, SweepDir(tmp_path / "sweep"), Options(trials=30, cwd=REPO))
    found = proposals(spec)
    if spec.method == "grid":
        assert sorted(map(repr, found)) == sorted(map(repr, spec.grid()))  # each combination exactly once
    with composer(REPO / "conf", run_checks=False) as check:
        # What a W&B agent runs: the file's command alone, which must log online to the sweep.
        agent = build_command(spec.command, spec.program, found[0], interpreter="python")
        cfg = check(agent[agent.index(spec.program) + 1 :])
        assert (cfg.logger.kind, cfg.logger.mode) == ("wandb", "online")
        for number, params in enumerate(found):
            output_dir = tmp_path / f"run{number}"
            argv = runner.command(number, params, output_dir)
            cfg = check(argv[argv.index(runner.program) + 1 :])
            assert cfg.output_dir == str(output_dir)
            assert cfg.logger.kind == "wandb" and cfg.logger.mode == "offline"  # the runner's mode
            for name, value in params.items():
                node = cfg
                if "." not in name:  # a config group: its file's `name`
                    assert cfg[name].name == value
                    continue
                for part in name.split("."):
                    node = node[part]
                assert node == value, name


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_metric_names_are_keys_the_report_writes(path: Path) -> None:
    """The sweep's metric (or, without one, each benchmark's `<name>/acc`) is a key of metrics.json / W&B."""
    needs_calibrated(path)
    from pore.app.config import build_benchmark
    from pore.app.evaluation.report import benchmark_metrics

    spec = shipped(path)
    if spec.metric is not None:
        assert spec.parameters["data"].is_fixed, "a metric key belongs to one benchmark: fix `data`"
    row = {"prediction": "yes", "answers": ["yes"], "meta": {}, "error": None}
    with composer(REPO / "conf", run_checks=False) as check:
        for data in spec.parameters["data"].values:  # one run's config per benchmark
            params = next(p for p in proposals(spec) if p["data"] == data)
            cfg = check([f"{k}={v}" for k, v in params.items()])
            benchmark, _ = build_benchmark(cfg)
            keys = set(benchmark_metrics(benchmark, str(cfg.data.name), [row]))
            expected = spec.metric.name if spec.metric else f"{cfg.data.name}/acc"
            assert expected in keys, (expected, sorted(keys))


def test_the_sweep_files_pass_wandbs_own_engine() -> None:
    """With `pip install wandb[sweeps]`: W&B's server engine validates the files and proposes runs."""
    sweeps = pytest.importorskip("sweeps")
    if not hasattr(sweeps, "next_run"):  # the repository's own sweeps/ folder, as a namespace package
        pytest.skip("W&B's sweeps package is not installed (pip install wandb[sweeps])")
    for path in SWEEP_FILES:
        config = yaml.safe_load(path.read_text())
        assert sweeps.schema_violations_from_proposed_config(config) == [], path
        assert sweeps.next_run(config, [], validate=True) is not None


# -- parsing: W&B semantics, and clear errors ----------------------------------------------------------------


def test_wandb_parameter_forms_map_onto_optuna_distributions() -> None:
    spec = parse_spec(
        minimal(
            method="bayes",
            metric={"name": "gqa/acc", "goal": "maximize"},
            parameters={
                "a": {"min": 1, "max": 8},  # W&B infers int_uniform from integer bounds
                "b": {"min": 0.0, "max": 1},  # ... and uniform otherwise
                "c": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1.0},
                "d": {"distribution": "q_uniform", "min": 0, "max": 64, "q": 16},
                "e": {"values": ["row", "index"]},
                "f": {"value": 64},
                "g": {"distribution": "categorical", "values": [1, 2]},
            },
        )
    )
    space = engine.distributions(spec)
    assert space["a"] == IntDistribution(1, 8)
    assert space["b"] == FloatDistribution(0.0, 1.0)
    assert space["c"] == FloatDistribution(1e-3, 1.0, log=True)
    assert space["d"] == IntDistribution(0, 64, step=16)
    assert space["e"] == CategoricalDistribution(["row", "index"])
    assert space["f"] == CategoricalDistribution([64])
    assert spec.parameters["d"].grid_values() == [0, 16, 32, 48, 64]
    assert spec.swept == ["a", "b", "c", "d", "e", "g"]


def test_a_metric_without_goal_minimises_as_in_wandb() -> None:
    spec = parse_spec(
        minimal(metric={"name": "gqa/acc"}, early_terminate={"type": "hyperband", "min_iter": 3})
    )
    assert spec.metric.goal == "minimize"
    assert any("minimize" in note for note in spec.notes)
    assert any("early_terminate is ignored" in note for note in spec.notes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "hyperband"}, "`method` must be one of grid, random, bayes"),
        ({"job": "x"}, "W&B Launch settings"),
        ({"extra": 1}, "unknown key(s) ['extra']; a sweep file may contain"),
        ({"parameters": {"strategy": {"parameters": {"keep": {"value": 8}}}}}, "dotted Hydra key"),
        ({"parameters": {"s": {"values": ["a", "b"], "probabilities": [0.5, 0.5]}}}, "`probabilities`"),
        ({"parameters": {"s": {"distribution": "normal", "mu": 0, "sigma": 1}}}, "unsupported key(s)"),
        (
            {"parameters": {"s": {"distribution": "normal", "min": 0, "max": 1}}},
            "is not supported; with min/max",
        ),
        ({"parameters": {"s": {"min": 0.0, "max": 1.0}}}, "a grid search needs a finite set of values"),
        ({"method": "bayes"}, "a bayes search needs `metric"),
        ({"parameters": {"s": {"values": [1, None]}}}, "write the string 'null'"),
        ({"parameters": {"s": {"values": [[2, 4]]}}}, "write it as a string, e.g. '[2, 4]'"),
        ({"parameters": {"s": {"min": 3, "max": 3}}}, "must be below max"),
        ({"parameters": {"s": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 3}}}, "multiple of q"),
        ({"parameters": {"s": {"distribution": "log_uniform_values", "min": 0, "max": 1}}}, "min > 0"),
        ({"command": ["${env}", "${interpreter}", "${program}", "${args}"]}, "${args_no_hyphens}"),
        ({"metric": {"name": "gqa/acc", "goal": "up"}}, "minimize or maximize"),
        ({"run_cap": 0}, "`run_cap` must be a positive integer"),
    ],
)
def test_unsupported_specs_fail_with_what_to_write(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SweepSpecError) as error:
        parse_spec(minimal(**changes), "x.yaml")
    assert message in str(error.value) and str(error.value).startswith("x.yaml: ")


# -- commands, overrides, identity ------------------------------------------------------------------------


def test_commands_are_built_like_the_wandb_agent_builds_them(tmp_path: Path) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"strategy": "fastv", "strategy.keep": 64, "strategy.prior.alpha": 0.25, "flag": False}
    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    ours = agent_args(params)
    for key, value in ours.items():
        assert theirs[key] == value, key
    template = [
        "${env}",
        "${interpreter}",
        "${program}",
        "--tag=${envvar:SWEEP_TAG}",
        "${args_no_hyphens}",
        "a=1",
    ]
    argv = build_command(
        template, "src/run.py", params, ["a=2", "output_dir=/x"], interpreter="py", environ={"SWEEP_TAG": "t"}
    )
    assert argv == [
        "/usr/bin/env",
        "py",
        "src/run.py",
        "--tag=t",
        "strategy=fastv",
        "strategy.keep=64",
        "strategy.prior.alpha=0.25",
        "flag=False",
        "a=2",  # the runner's and the user's overrides come last and win
        "output_dir=/x",
    ]
    json_argv = build_command(
        ["${program}", "${args_json_file}", "${args_no_hyphens}"],
        "p",
        {"k": 1},
        json_file=tmp_path / "a.json",
    )
    assert json.loads(Path(json_argv[1]).read_text()) == {"k": 1}


def test_overrides_narrow_swept_parameters_and_add_fixed_settings() -> None:
    spec = load_spec(REPO / "sweeps" / "strategy_grid.yaml")
    narrowed, extra = apply_overrides(
        spec, ["strategy.keep=8,16", "data=spatial", "model=tiny_llava", "data.limit=12", "+x.y=1"]
    )
    assert narrowed.parameters["strategy.keep"].values == (8, 16)
    assert narrowed.parameters["data"].values == ("spatial",) and narrowed.parameters["data"].is_fixed
    assert extra == ["data.limit=12", "+x.y=1"]
    strategies = len(spec.parameters["strategy"].values)
    assert strategies >= 4 and len(narrowed.grid()) == strategies * 2
    with pytest.raises(SweepSpecError, match="--dir"):
        apply_overrides(spec, ["output_dir=/tmp/x"])
    assert dedupe(["a=1", "b=2", "a=3", "--flag"]) == ["b=2", "a=3", "--flag"]


def test_only_result_changing_settings_make_another_sweep() -> None:
    spec = load_spec(REPO / "sweeps" / "prior_bayes.yaml")
    base = identity(spec, ["data.limit=100"])
    for logistics in [*(f"{key}=4" for key in LOGISTICS), "trainer.devices=8", "logger=csv"]:
        assert identity(spec, ["data.limit=100", logistics]) == base, logistics
    assert identity(spec, ["data.limit=200"]) != base
    assert identity(apply_overrides(spec, ["strategy.keep=32"])[0], ["data.limit=100"]) != base

    from pore.app.identity import DATA_LOGISTICS

    assert {f"data.{key}" for key in DATA_LOGISTICS} == set(LOGISTICS)


# -- the engine -------------------------------------------------------------------------------------------


def test_random_and_bayes_proposals_are_seeded_and_inside_the_space() -> None:
    spec = load_spec(REPO / "sweeps" / "prior_bayes.yaml")
    first = engine.propose(spec, 14, seed=3)
    assert first == engine.propose(spec, 14, seed=3)
    assert first != engine.propose(spec, 14, seed=4)
    for params in first:
        assert 0.0 <= params["strategy.prior.alpha"] <= 0.95 and 0.0 <= params["strategy.prior.sigma"] <= 3.0
        assert params["strategy.layer"] in range(1, 9) and params["strategy.prior.position"] in (
            "row",
            "index",
        )
    assert len({json.dumps(p, sort_keys=True) for p in first}) == len(first)
    random_spec = parse_spec(minimal(method="random", parameters={"x": {"min": 0.0, "max": 1.0}}))
    assert len({p["x"] for p in engine.propose(random_spec, 5)}) == 5


def test_a_grid_across_benchmarks_is_ranked_within_each_benchmark(tmp_path: Path) -> None:
    """No metric (strategy_grid): one table per benchmark, by `<benchmark>/acc` read from metrics.json."""
    spec, _ = apply_overrides(load_spec(REPO / "sweeps" / "strategy_grid.yaml"), ["strategy=fastv,random"])
    space = engine.distributions(spec)
    accuracy = {("gqa", "fastv"): 0.5, ("gqa", "random"): 0.4, ("textvqa", "fastv"): 0.2}
    accuracy |= {("textvqa", "random"): 0.3}
    trials = []
    for number, ((data, strategy), acc) in enumerate(accuracy.items()):
        run = tmp_path / f"run{number}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"name": data}}))
        (run / "metrics.json").write_text(json.dumps({f"{data}/acc": acc, "eff/prefill_tflops": 1.0}))
        params = {"model": "llava15_7b", "data": data, "strategy": strategy, "strategy.keep": 64}
        trial = optuna.trial.create_trial(
            params=params, distributions=space, value=0.0, user_attrs={leaderboard.OUTPUT_DIR: str(run)}
        )
        trial.number = number
        trials.append(trial)
    entries = leaderboard.collect(trials, "acc")
    text = leaderboard.table(entries, spec, "acc", True, ["eff/prefill_tflops"], None)
    gqa, textvqa = text.split("rank  trial  gqa/acc")[1], text.split("rank  trial  textvqa/acc")[1]
    # columns: rank, trial, <benchmark>/acc, data, strategy, ...
    assert [line.split()[4] for line in gqa.splitlines()[1:3]] == ["fastv", "random"]
    assert [line.split()[4] for line in textvqa.splitlines()[1:3]] == ["random", "fastv"]
    assert "ranked by acc (maximize)" in text
    path = tmp_path / "board.csv"
    leaderboard.write_csv(path, entries, spec, "acc", True)
    rows = list(csv.DictReader(path.open()))
    assert {(r["benchmark"], r["strategy"], r["acc"]) for r in rows} == {
        (data, strategy, str(acc)) for (data, strategy), acc in accuracy.items()
    }


def small_spec(tmp_path: Path, **changes: Any) -> Path:
    """A sweep over the embedded model (64 image tokens per image), in the shipped files' form."""
    raw = {
        "name": "small",
        "method": "grid",
        "metric": {"name": "spatial/acc", "goal": "maximize"},
        "program": "src/run.py",
        "parameters": {
            "strategy": {"value": "fastv"},
            "strategy.keep": {"values": [4, 16, 48]},
            "data.limit": {"value": 40},
        },
        # As the shipped files: logger.mode=online is what a W&B agent needs; offline it must be replaced.
        "command": [
            "${env}",
            "${interpreter}",
            "${program}",
            "${args_no_hyphens}",
            "logger=wandb",
            "logger.mode=online",
        ],
    }
    raw.update(changes)
    path = tmp_path / "small.yaml"
    path.write_text("# Which budget is best on the tiny model?\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_dead_runners_trial_is_claimed_again_and_a_live_ones_is_not(tmp_path: Path) -> None:
    """The resume logic without subprocesses: RUNNING + free lock = orphan; RUNNING + held lock = busy."""
    spec = load_spec(small_spec(tmp_path))
    folder = SweepDir(tmp_path / "state")
    first = Runner(spec, folder, Options(cwd=REPO))
    folder.create(identity(spec, []), engine.direction(spec))
    claim = first._next()
    assert claim is not None and claim.number == 0 and not claim.again
    other = Runner(spec, folder, Options(cwd=REPO))._next()  # trial 0's lock is held: a new trial
    assert other is not None and other.number == 1 and other.params != claim.params
    for fd in claim.fds:  # the first runner dies
        os.close(fd)
    again = Runner(spec, folder, Options(cwd=REPO))._next()
    assert again is not None and (again.number, again.params, again.again) == (0, claim.params, True)
    assert again.output_dir == claim.output_dir
    states = [t.state for t in folder.load().get_trials()]
    assert states == [TrialState.RUNNING, TrialState.RUNNING]
    with pytest.raises(SweepStateError, match="holds another sweep"):
        folder.create(identity(spec, ["data.limit=5"]), "maximize")


# -- offline sweeps end to end (subprocesses on the embedded model) ----------------------------------------


def partial_run(folder: Path) -> bool:
    """A trial is answering questions (the per-rank file exists until the run merges it at the end)."""
    for rank_file in folder.glob("runs/*/predictions.rank0.jsonl"):
        try:
            if len(rank_file.read_text().splitlines()) >= 2:
                return True
        except OSError:
            pass
    return False


@pytest.mark.slow
def test_offline_sweep_resumes_after_being_killed_and_ranks_by_the_metric(
    tmp_path: Path, sweep_main: Any
) -> None:
    path, folder = small_spec(tmp_path), tmp_path / "state"
    args = [str(path), "--trials", "3", "--dir", str(folder), "--", "data.batch_size=1"]
    runner = subprocess.Popen(
        [sys.executable, str(SWEEP), *args],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the runner and its run are killed together
    )
    deadline = time.time() + 400
    while time.time() < deadline and runner.poll() is None:
        completed = list(folder.glob("runs/*/metrics.json"))
        if completed and partial_run(folder):
            os.killpg(runner.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    runner.wait()
    assert runner.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"

    storage = SweepDir(folder)
    states = {t.number: t.state for t in storage.load().get_trials()}
    killed = [n for n, s in states.items() if s == TrialState.RUNNING]
    assert len(killed) == 1 and TrialState.COMPLETE in states.values()

    status, stdout = sweep_main(*args)
    assert status == 0, stdout[-3000:]
    assert f"trial {killed[0]} (again: its runner had stopped)" in stdout

    trials = storage.load().get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # none lost, none run twice
    keeps = sorted(t.params["strategy.keep"] for t in trials)
    assert keeps == [4, 16, 48]
    # The killed trial resumed its own predictions, and answered each question once.
    resumed = next(t for t in trials if t.number == killed[0])
    log = Path(resumed.user_attrs["log"]).read_text()
    assert (
        len(re.findall(r"^=== \d{4}-", log, re.MULTILINE)) == 2
        and "questions already answered are skipped" in log
    )
    output_dir = Path(resumed.user_attrs["output_dir"])
    ids = [
        json.loads(line)["question_id"]
        for line in (output_dir / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(ids) == len(set(ids)) == 40

    # The leaderboard: every parameter set once, ranked by spatial/acc as read from each run's metrics.json.
    with (folder / "leaderboard.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    assert sorted(int(r["strategy.keep"]) for r in rows) == [4, 16, 48]
    values = [float(r["spatial/acc"]) for r in rows]
    assert values == sorted(values, reverse=True)
    for row in rows:
        metrics = json.loads((Path(row["output_dir"]) / "metrics.json").read_text())
        assert float(row["spatial/acc"]) == pytest.approx(metrics["spatial/acc"])
        assert metrics["eff/visual_tokens"] == int(row["strategy.keep"])
    table = stdout[stdout.index("rank  trial") :].splitlines()
    assert [line.split()[3] for line in table[1:4]] == [r["strategy.keep"] for r in rows]

    # W&B offline (the file's logger.mode=online replaced): one finished run per trial, listed for wandb sync.
    listed = (folder / "wandb_offline_runs.txt").read_text().split()
    assert len(listed) == 3
    for run in listed:
        assert Path(run, "files", "metrics.json").exists() and list(Path(run).glob("run-*.wandb"))
    assert "wandb sync" in stdout

    # Rerunning a finished sweep runs nothing and prints the same ranking.
    status, again = sweep_main(*args)
    assert status == 0 and not re.search(r"^trial \d", again, re.MULTILINE)
    assert again[again.index("rank  trial") :] == stdout[stdout.index("rank  trial") :]
    assert len(storage.load().get_trials()) == 3


@pytest.mark.slow
def test_a_failed_run_is_recorded_with_why_and_the_sweep_goes_on(tmp_path: Path, sweep_main: Any) -> None:
    path = small_spec(
        tmp_path,
        parameters={"strategy": {"value": "pore_linear"}, "strategy.prior.alpha": {"values": [1.5]}},
        command=["${env}", "${interpreter}", "${program}", "${args_no_hyphens}", "logger=none"],
    )
    folder = tmp_path / "state"
    status, stdout = sweep_main(str(path), "--dir", str(folder))
    assert status == 1, stdout
    assert "FAILED, exit 2" in stdout and "alpha" in stdout  # a user error (exit 2); the log says why
    assert f"failed: trial 0: exit 2, see {folder / 'logs' / 'trial-0.log'}" in stdout
    assert [t.state for t in SweepDir(folder).load().get_trials()] == [TrialState.FAIL]  # counted: done


def test_retry_failed_queues_a_failed_parameter_set_once(tmp_path: Path) -> None:
    spec = load_spec(small_spec(tmp_path))
    folder = SweepDir(tmp_path / "state")
    folder.create(identity(spec, []), engine.direction(spec))
    runner = Runner(spec, folder, Options(cwd=REPO))
    claims = [runner._next() for _ in range(3)]
    runner._tell(claims[0], None, {"failure": "exit 1"})
    runner._tell(claims[1], 0.5, {})
    for claim in claims[:2]:
        for fd in claim.fds:
            os.close(fd)
    assert runner._next() is None  # trial 2 still runs (its lock held): the grid's 3 trials are taken
    retry = Runner(spec, folder, Options(cwd=REPO, retry_failed=True))
    retry._retry_failed()
    retry._retry_failed()  # already queued: not twice
    again = retry._next()
    assert again is not None and again.number == 3 and again.params == claims[0].params
    trials = folder.load().get_trials()
    assert trials[3].user_attrs["retry_of"] == 0 and len(trials) == 4


def test_dry_run_narrows_a_shipped_file_to_the_tiny_model_and_checks_every_config(sweep_main: Any) -> None:
    """Each trial is checked as its run will check it (preflight on the composed config): SparseVLM's three
    stages after layers 3 / 7 / 16 do not fit the 4-layer embedded model, and the dry run says so."""
    grid = str(REPO / "sweeps" / "strategy_grid.yaml")
    status, stdout = sweep_main(
        grid, "--dry-run", "--", "model=tiny_llava", "data=spatial", "strategy.keep=8,16", "data.limit=12"
    )
    strategies = load_spec(REPO / "sweeps" / "strategy_grid.yaml").parameters["strategy"].values
    proposals = 2 * len(strategies)
    assert status == 1, stdout[-3000:]
    assert f"{proposals - 2} of {proposals} pass the checks of their run" in stdout
    invalid = [line for line in stdout.splitlines() if line.startswith("    INVALID: ")]
    assert len(invalid) == 2 and all(
        "strategy.layer=[3, 7, 16] comes from strategy=sparsevlm" in line for line in invalid
    )
    commands = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(commands) == proposals
    assert all("data.limit=12" in c and "logger.mode=offline" in c for c in commands)
    assert {re.search(r"strategy=(\w+) ", c).group(1) for c in commands} == set(strategies)
    folder = re.search(r"folder (\S+);", stdout).group(1)
    assert not Path(folder).exists()  # a dry run writes nothing

    fitting = ",".join(name for name in strategies if name != "sparsevlm")
    status, stdout = sweep_main(
        grid, "--dry-run", "--", "model=tiny_llava", "data=spatial", f"strategy={fitting}", "strategy.keep=8"
    )
    assert status == 0 and f"{len(strategies) - 1} of {len(strategies) - 1} pass" in stdout, stdout[-3000:]

    bayes = str(REPO / "sweeps" / "prior_bayes.yaml")
    status, stdout = sweep_main(bayes, "--dry-run", "--trials", "2", "--", "strategy.keep=0")
    assert (
        status == 1
        and "0 of 2 pass" in stdout
        and "INVALID" in stdout
        and "strategy.keep must be a positive integer" in stdout
    )


def test_optuna_is_the_engine() -> None:
    assert isinstance(
        engine.sampler(load_spec(REPO / "sweeps" / "prior_bayes.yaml"), 0, 0), optuna.samplers.TPESampler
    )
    assert isinstance(
        engine.sampler(load_spec(REPO / "sweeps" / "strategy_grid.yaml"), 0, 0), optuna.samplers.GridSampler
    )
