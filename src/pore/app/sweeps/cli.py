"""`python src/sweep.py SWEEP.yaml [options] [-- overrides]`: run a W&B sweep file offline, resumably."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pore.app.cli import load_plugins
from pore.app.sweeps import engine, leaderboard
from pore.app.sweeps.overrides import apply_overrides
from pore.app.sweeps.runner import Options, Runner, budget, identity, program_path
from pore.app.sweeps.spec import SweepSpec, SweepSpecError, load_spec
from pore.app.sweeps.state import SweepDir, SweepStateError, default_dir, trial_dir_name
from pore.app.sweeps.validate import composer, config_dir_of
from pore.errors import UserError, one_line

EPILOG = """
examples:
  python src/sweep.py sweeps/prior_bayes.yaml --trials 40
  python src/sweep.py sweeps/strategy_grid.yaml -- data=gqa strategy.keep=64,128 data.limit=2000
  python src/sweep.py sweeps/strategy_grid.yaml --dry-run        # the commands, each config checked
  python src/sweep.py sweeps/prior_bayes.yaml --leaderboard      # the ranking so far (same file + overrides)
  CUDA_VISIBLE_DEVICES=1 python src/sweep.py sweeps/prior_bayes.yaml --trials 40   # a 2nd runner, same sweep

Overrides after the file name are Hydra overrides: one naming a swept parameter narrows it (key=a or
key=a,b,c), any other is added to every run. The sweep's folder (default outputs/sweeps/<name>-<digest>)
holds its state: rerun the same command to resume after a crash.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python src/sweep.py",
        description="Run a W&B sweep file offline: Optuna proposes each run, src/run.py evaluates it in a "
        "subprocess, and the state stays on disk (rerun the same command to resume).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", help="a W&B sweep file (sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    p.add_argument(
        "--trials", type=int, help="trials in all (default: the grid's size, or the file's run_cap)"
    )
    p.add_argument("--dir", type=Path, help="the sweep's folder (default: outputs/sweeps/<name>-<digest>)")
    p.add_argument("--seed", type=int, default=0, help="the engine's seed (default 0)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the first trials' commands and check their configs"
    )
    p.add_argument(
        "--leaderboard", action="store_true", help="print the ranking of the sweep's folder and exit"
    )
    p.add_argument(
        "--rank-by", help="metrics.json key to rank by; without '/' it is per benchmark (e.g. acc)"
    )
    p.add_argument("--goal", choices=("maximize", "minimize"), help="direction of --rank-by")
    p.add_argument("--top", type=int, help="rows per table (default: all)")
    p.add_argument(
        "--columns", default="eff/prefill_tflops", help="metrics.json keys shown too (comma-separated)"
    )
    p.add_argument("--retry-failed", action="store_true", help="queue the failed trials' settings again")
    p.add_argument(
        "--wandb-mode",
        choices=("offline", "online", "disabled"),
        default="offline",
        help="for runs whose command selects logger=wandb (default offline; upload later with wandb sync)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show each run's output, not only its log")
    return p


def rank_settings(spec: SweepSpec, rank_by: str | None, goal: str | None) -> tuple[str, bool]:
    if rank_by is None:
        # Without a metric (a grid across benchmarks), rank by each benchmark's accuracy.
        rank_by = spec.metric.name if spec.metric else "acc"
    if goal is None:
        goal = spec.metric.goal if spec.metric and spec.metric.name == rank_by else "maximize"
    return rank_by, goal == "maximize"


def show_leaderboard(spec: SweepSpec, folder: SweepDir, args: argparse.Namespace) -> None:
    rank_by, maximize = rank_settings(spec, args.rank_by, args.goal)
    entries = leaderboard.load_entries(folder.load(), rank_by)
    columns = [c for c in args.columns.split(",") if c]
    print()
    compared = leaderboard.versus(entries, maximize, rank_by)  # paired with the best: once for both
    print(leaderboard.table(entries, spec, rank_by, maximize, columns, args.top, compared))
    csv_path = folder.root / "leaderboard.csv"
    leaderboard.write_csv(csv_path, entries, spec, rank_by, maximize, compared)
    print(f"\nall trials and metrics: {csv_path}")
    runs = leaderboard.wandb_offline_runs(entries)
    if runs:
        listing = folder.root / "wandb_offline_runs.txt"
        listing.write_text("".join(f"{run}\n" for run in runs))
        print(f"upload the W&B runs: wandb sync $(cat {listing})")


def dry_run(spec: SweepSpec, folder: SweepDir, args: argparse.Namespace, options: Options) -> int:
    total, notes = (
        budget(spec, args.trials) if spec.method == "grid" or args.trials or spec.run_cap else (10, [])
    )
    for note in (*spec.notes, *notes):
        print(f"note: {note}")
    print(f"sweep {spec.name} ({spec.method}), folder {folder.root}; the first {total} proposals:")
    runner = Runner(spec, folder, Options(**{**options.__dict__, "trials": total}))
    failures = 0
    program = Path(runner.program)
    with composer(config_dir_of(program)) as check:
        for number, params in enumerate(engine.propose(spec, total, args.seed)):
            params = {name: params[name] for name in spec.parameters}
            argv = runner.command(number, params, folder.run_dir(trial_dir_name(params, spec.swept)))
            print(f"[{number}] {' '.join(argv)}")
            try:
                # As the trial's src/run.py does: its plug-in folders first (plugins=, $PORE_PLUGINS).
                check(load_plugins(argv[argv.index(runner.program) + 1 :]))
            except UserError as error:  # what the trial would end with, one line
                failures += 1
                print(f"    INVALID: {one_line(error)}")
            except Exception as error:  # Hydra's own errors say what is wrong
                failures += 1
                print(f"    INVALID: {type(error).__name__}: {one_line(error)}")
    print(f"{total - failures} of {total} pass the checks of their run (composed, then preflight)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # one line per trial, also in a SLURM log file
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after `--` is an override, even if it looks like an option; before it argparse reads both.
    after = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser().parse_intermixed_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = [*args.overrides, *after]
    try:
        spec, extra = apply_overrides(load_spec(args.sweep), args.overrides)
        options = Options(
            trials=args.trials,
            seed=args.seed,
            overrides=extra,
            wandb_mode=args.wandb_mode,
            retry_failed=args.retry_failed,
            verbose=args.verbose,
        )
        if not args.leaderboard:
            program_path(spec, options.cwd)
        folder = SweepDir(args.dir or default_dir(spec.name or "sweep", identity(spec, extra)))
        if args.dry_run:
            return dry_run(spec, folder, args, options)
        status = 0 if args.leaderboard else Runner(spec, folder, options).run()
        if status != 130:
            show_leaderboard(spec, folder, args)
        return status
    except (SweepSpecError, SweepStateError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
