"""The offline runner: ask the engine for the next parameter set, run it as a subprocess, tell the result.

Every step is recorded in the sweep's folder before the next one starts (see `pore.app.sweeps.state`), so the
runner can be killed at any moment and rerun with the same command: finished trials are kept, a trial that
was running is run again in its own output_dir (the evaluation resumes its predictions there) and told to
the same Optuna trial, and the engine goes on from everything that finished. Several runners may share one
folder (one per GPU): asks and tells are serialised by a lock, and each trial is run by one of them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pore.app.sweeps import engine
from pore.app.sweeps.command import build_command
from pore.app.sweeps.leaderboard import OUTPUT_DIR
from pore.app.sweeps.overrides import dedupe, is_logistics, override_key, split_override
from pore.app.sweeps.spec import SweepSpec, SweepSpecError, digest
from pore.app.sweeps.state import SweepDir, trial_dir_name

# Settings a W&B agent's run picks up from the environment; a trial of the offline runner is no agent run.
AGENT_ENV = ("WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_RESUME")


@dataclass
class Options:
    trials: int | None = None
    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # appended to every trial's command
    wandb_mode: str = "offline"  # for runs whose command says logger=wandb
    retry_failed: bool = False
    verbose: bool = False
    interpreter: str = sys.executable
    cwd: Path = field(default_factory=Path.cwd)


@dataclass
class Claim:
    """A trial this runner is about to run, with the lock fds that say so to other runners."""

    number: int
    params: dict[str, Any]
    output_dir: Path
    fds: list[int]
    again: bool = False  # a trial whose runner died


def identity(spec: SweepSpec, overrides: list[str]) -> dict[str, Any]:
    """What makes two sweeps the same experiment: the spec and the result-changing fixed overrides."""
    ident = spec.identity()

    def relevant(token: str) -> bool:
        key = override_key(token)
        return key is None or not is_logistics(key)

    ident["command"] = [token for token in ident["command"] if relevant(token)]
    ident["overrides"] = [token for token in overrides if relevant(token)]
    return ident


def budget(spec: SweepSpec, trials: int | None) -> tuple[int, list[str]]:
    """How many trials the sweep finishes in all (across resumes and runners), and notes about it."""
    notes = []
    if spec.method == "grid":
        size = len(spec.grid())
        limit = trials or spec.run_cap or size
        if limit > size:
            notes.append(f"the grid has {size} combinations; --trials {limit} runs each once")
        return min(limit, size), notes
    limit = trials or spec.run_cap
    if limit is None:
        raise SweepSpecError(
            f"a {spec.method} search never ends by itself: give --trials N (or run_cap in the file)"
        )
    return limit, notes


def program_path(spec: SweepSpec, cwd: Path) -> Path:
    """`program:` relative to the working directory, as a W&B agent reads it (run from the repo root)."""
    path = Path(spec.program)
    path = path if path.is_absolute() else cwd / path
    if not path.exists():
        raise SweepSpecError(
            f"program {spec.program!r} not found from {cwd}; run the sweep from the repository root, "
            "as a W&B agent would be"
        )
    return path


def logger_overrides(argv: list[str], overrides: list[str], mode: str, sweep: str, trial: int) -> list[str]:
    """W&B settings for a run whose command selects logger=wandb: the runner's mode, runs grouped by sweep.

    The file's `logger.mode=online` is meant for W&B agents; offline it is replaced by `mode`. What the user
    gave on the runner's command line is left as given.
    """
    chosen = [parts[2] for parts in map(split_override, argv) if parts is not None and parts[1] == "logger"]
    if not chosen or chosen[-1] != "wandb":
        return []
    given = {override_key(token) for token in overrides}
    defaults = {"logger.mode": mode, "logger.group": sweep, "logger.name": f"{sweep}-trial{trial}"}
    return [f"{key}={value}" for key, value in defaults.items() if key not in given]


def _die_with_parent() -> None:
    """In the child: be killed when the runner dies, so no orphaned run keeps writing a trial's folder."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (scancel, a preempted job) stops the runner like Ctrl-C: the running trial stays resumable."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Runner:
    def __init__(self, spec: SweepSpec, folder: SweepDir, options: Options) -> None:
        self.spec, self.folder, self.options = spec, folder, options
        self.program = str(program_path(spec, options.cwd))
        self.space = engine.distributions(spec)
        self.total, self.notes = budget(spec, options.trials)
        self.ran = self.failed = 0

    # -- bookkeeping under the study lock ---------------------------------------------------------------

    def _params(self, trial: FrozenTrial | optuna.trial.Trial) -> dict[str, Any]:
        return {name: trial.params[name] for name in self.spec.parameters}

    @staticmethod
    def _retried(trials: list[FrozenTrial]) -> set[int]:
        """Failed trials queued again by --retry-failed (the retry counts, not the failure)."""
        return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}

    def _used(self, trials: list[FrozenTrial]) -> int:
        """The finished trials that count towards the sweep's budget."""
        retried = self._retried(trials)
        return sum(
            t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.number not in retried)
            for t in trials
        )

    def _target_reached(self, trials: list[FrozenTrial]) -> FrozenTrial | None:
        metric = self.spec.metric
        if metric is None or metric.target is None:
            return None
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        return next((t for t in done if metric.reached(t.value)), None)

    def _output_dir(self, params: dict[str, Any]) -> Path:
        return self.folder.run_dir(trial_dir_name(params, self.spec.swept))

    def _next(self) -> Claim | None:
        """Claim an orphaned trial, or ask the engine for a new one; None when the sweep is done."""
        while True:
            with self.folder.study_lock():
                study = self.folder.load()
                trials = study.get_trials(deepcopy=False)
                reached = self._target_reached(trials)
                if reached is not None:
                    print(f"trial {reached.number} reached the target {self.spec.metric.target}: sweep done")
                    return None
                for trial in trials:
                    if trial.state != TrialState.RUNNING:
                        continue
                    fd = self.folder.try_lock_trial(trial.number)
                    if fd is None:  # another runner's, alive
                        continue
                    if set(trial.params) != set(self.spec.parameters):
                        # Its runner died while Optuna was still writing its parameters: nothing ran.
                        self.folder.set_user_attr(trial.number, "failure", "its runner died while asking")
                        study.tell(trial.number, state=TrialState.FAIL)
                        os.close(fd)
                        continue
                    params = self._params(trial)
                    return Claim(trial.number, params, self._output_dir(params), [fd], again=True)
                # Every RUNNING trial left is another live runner's; WAITING ones are queued retries.
                running = sum(t.state == TrialState.RUNNING for t in trials)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if not waiting and self._used(trials) + running >= self.total:
                    return None
                study.sampler = engine.sampler(self.spec, self.options.seed, len(trials))
                trial = study.ask(self.space)
                fd = self.folder.try_lock_trial(trial.number)
                assert fd is not None, "a new trial's lock is free (asks are serialised)"
                params = self._params(trial)
                output_dir = self._output_dir(params)
                self.folder.set_user_attr(trial.number, OUTPUT_DIR, str(output_dir))
                same = [
                    t
                    for t in trials
                    if t.state == TrialState.COMPLETE and t.params and self._params(t) == params
                ]
                if not same:
                    return Claim(trial.number, params, output_dir, [fd])
                # The engine proposed settings that already ran (likely with categorical choices): their
                # result is known, so the trial is told it without running the model again.
                for key in ("metrics", "seconds"):
                    if key in same[0].user_attrs:
                        self.folder.set_user_attr(trial.number, key, same[0].user_attrs[key])
                self.folder.set_user_attr(trial.number, "duplicate_of", same[0].number)
                study.tell(trial.number, same[0].value)
                os.close(fd)
                print(f"trial {trial.number}: same settings as trial {same[0].number}, its result reused")

    def _retry_failed(self) -> None:
        with self.folder.study_lock():
            study = self.folder.load()
            trials = study.get_trials(deepcopy=False)
            retried = self._retried(trials)
            complete = {digest(self._params(t)) for t in trials if t.state == TrialState.COMPLETE}
            for trial in trials:
                if trial.state != TrialState.FAIL or trial.number in retried:
                    continue
                params = self._params(trial)
                if digest(params) not in complete:
                    study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
                    complete.add(digest(params))  # queued once, even if it failed several times
                    print(f"trial {trial.number} failed before: its settings are queued again")

    def _tell(self, claim: Claim, value: float | None, attrs: dict[str, Any]) -> None:
        with self.folder.study_lock():
            study = self.folder.load()
            for key, item in attrs.items():
                self.folder.set_user_attr(claim.number, key, item)
            if value is None:
                study.tell(claim.number, state=TrialState.FAIL)
            else:
                study.tell(claim.number, value)

    # -- running one trial --------------------------------------------------------------------------------

    def command(self, number: int, params: dict[str, Any], output_dir: Path) -> list[str]:
        extra = [*self.options.overrides, f"output_dir={output_dir}"]
        base = build_command(
            self.spec.command,
            self.program,
            params,
            extra,
            interpreter=self.options.interpreter,
            json_file=output_dir / "sweep_params.json",
        )
        sweep = self.spec.name or "sweep"
        return dedupe(
            [*base, *logger_overrides(base, self.options.overrides, self.options.wandb_mode, sweep, number)]
        )

    def _environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in AGENT_ENV}
        env["WANDB_MODE"] = self.options.wandb_mode
        env["PYTHONUNBUFFERED"] = "1"  # the trial's log fills as it goes (tail -f logs/trial-N.log)
        return env

    def _execute(self, claim: Claim) -> tuple[float | None, dict[str, Any]]:
        """Run the trial's command; (metric value or None on failure, attributes to record)."""
        claim.output_dir.mkdir(parents=True, exist_ok=True)
        # Held while the folder is written: two trials with the same settings never run it at once.
        claim.fds.append(self.folder.lock_run_dir(claim.output_dir))
        argv = self.command(claim.number, claim.params, claim.output_dir)
        log_path = self.folder.log_file(claim.number)
        started = time.time()
        with log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                argv,
                cwd=self.options.cwd,
                env=self._environment(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(claim.fds),  # the run holds the trial's lock too, until it exits
                preexec_fn=_die_with_parent,
            )
            try:
                assert process.stdout is not None
                for chunk in iter(lambda: process.stdout.read1(1 << 16), b""):
                    log.write(chunk)
                    log.flush()
                    if self.options.verbose:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                returncode = process.wait()
            except BaseException:
                # Ctrl-C / SIGTERM: let the run stop (it got SIGINT too when run from a terminal), then go.
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                raise
        seconds = time.time() - started
        attrs: dict[str, Any] = {"returncode": returncode, "seconds": round(seconds, 1), "log": str(log_path)}
        if returncode != 0:
            attrs["failure"] = f"exit {returncode}, see {log_path}"
            return None, attrs
        return self._read_metric(claim, attrs)

    def _read_metric(self, claim: Claim, attrs: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
        """The trial's metric from its metrics.json (None with the reason in `attrs` when it has none)."""
        try:
            metrics = json.loads((claim.output_dir / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            attrs["failure"] = f"no readable metrics.json in {claim.output_dir} ({error})"
            return None, attrs
        attrs["metrics"] = metrics
        metric = self.spec.metric
        if metric is None:
            # A grid or random sweep without a metric: the samplers ignore values, Optuna still wants one.
            return 0.0, attrs
        value = metrics.get(metric.name)
        if not isinstance(value, (int, float)):
            keys = ", ".join(sorted(metrics))
            attrs["failure"] = f"metrics.json has no {metric.name!r} (it has: {keys})"
            return None, attrs
        if not math.isfinite(value):  # Optuna would fail the trial anyway; say why
            attrs["failure"] = f"{metric.name} is {value} in metrics.json"
            return None, attrs
        return float(value), attrs

    def _report(self, claim: Claim, value: float | None, attrs: dict[str, Any]) -> None:
        shown = " ".join(f"{name}={claim.params[name]}" for name in self.spec.swept) or "(fixed settings)"
        again = " (again: its runner had stopped)" if claim.again else ""
        if value is None:
            print(f"trial {claim.number}{again} {shown}: FAILED, {attrs['failure']}")
            tail = Path(attrs["log"]).read_text(errors="replace").splitlines()[-15:]
            print("\n".join("    " + line for line in tail))
            return
        shown_value = f"{self.spec.metric.name} = {value:.4g}" if self.spec.metric else "done"
        print(f"trial {claim.number}{again} {shown}: {shown_value} ({attrs['seconds']:.0f} s)", flush=True)

    # -- the loop -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run trials until the sweep's budget is used.

        Returns the exit status: 0, 1 when a trial this call ran failed (the others still ran), 130 when
        interrupted.
        """
        self.folder.create(identity(self.spec, self.options.overrides), engine.direction(self.spec))
        print(
            f"sweep {self.spec.name} ({self.spec.method}) in {self.folder.root}: {self.total} trials in all"
        )
        trials = self.folder.load().get_trials(deepcopy=False)
        if trials:
            counts = {state: sum(t.state == state for t in trials) for state in TrialState}
            print(
                f"resuming: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.FAIL]} failed, "
                f"{counts[TrialState.RUNNING]} running or stopped"
            )
        for note in (*self.spec.notes, *self.notes):
            print(f"note: {note}")
        if self.options.retry_failed:
            self._retry_failed()
        claim: Claim | None = None
        try:
            with _sigterm_as_interrupt():
                while (claim := self._next()) is not None:
                    value, attrs = self._execute(claim)
                    self._tell(claim, value, attrs)
                    self._release(claim)
                    self.ran += 1
                    self.failed += value is None
                    self._report(claim, value, attrs)
        except KeyboardInterrupt:
            if claim is not None and claim.fds:
                self._release(claim)  # free for the next runner (also when this one is a library call)
                print(f"\ninterrupted: trial {claim.number} runs again (resuming its predictions) on a rerun")
            return 130
        return 1 if self.failed else 0

    @staticmethod
    def _release(claim: Claim) -> None:
        for fd in claim.fds:
            os.close(fd)
        claim.fds.clear()
