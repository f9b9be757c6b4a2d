"""`python src/compare.py`: can the data tell two runs apart? And Pareto fronts of a multirun or sweep.

    python src/compare.py RUN_A RUN_B [RUN_C ...]      # each run against the first, on the same questions
    python src/compare.py RUN_A RUN_B --reference RUN_UNPRUNED   # plus agreement with the unpruned run
    python src/compare.py --pareto multirun/2025-01-01_12-00-00 [--bench outputs/bench/<report>.json]

For each run after the first: every value of the benchmark's metric as first, second and second - first
with a paired-bootstrap interval, McNemar's exact test for accuracy-type values, and whether the data tell the
difference from zero; the share of questions whose answers agree, and the overlap (Jaccard) of the image
tokens the two runs kept. Runs of other benchmarks, protocols or question sets are refused (exit status 2).
A run that did not prune (strategy=none), or `--reference`, is the unpruned reference: every run's answer
agreement with it is shown. Writes compare.md and kept_rows.png (kept tokens by image row, one curve per
run) to --out (default <first run>/compare). docs/statistics.md explains every number.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from pore.app.comparison.paired import PairComparison, compare_pair, verdict
from pore.app.comparison.runs import RunResult, check_comparable, find_runs, load_result
from pore.app.evaluation.uncertainty import agreement
from pore.errors import UserError, user_errors
from pore.metrics.uncertainty import metric_intervals
from pore.stats.bootstrap import BootstrapSettings, Interval, bootstrap_mean

log = logging.getLogger("pore")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (output_dir of src/run.py)")
    parser.add_argument("--reference", type=Path, help="the unpruned run, for answer agreement")
    parser.add_argument("--metrics", nargs="+", help="keys to compare (e.g. acc f1); default: all of them")
    parser.add_argument("--pareto", type=Path, help="a multirun / sweep folder: draw its Pareto fronts")
    parser.add_argument("--bench", type=Path, help="with --pareto: a src/bench.py report of the same model")
    parser.add_argument("--bench-batch", type=int, help="the report's batch size to read (default: smallest)")
    parser.add_argument("--metric", help="with --pareto: the value to plot (default: the headline)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--out", type=Path, help="where to write the table and figures")
    parser.add_argument("--wandb", action="store_true", help="also log the tables and figures to W&B")
    parser.add_argument("--project", default="pore", help="W&B project for --wandb")
    return parser.parse_args(argv)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def select_keys(keys: Sequence[str], wanted: Sequence[str] | None, benchmark: str) -> list[str]:
    if not wanted:
        return list(keys)
    chosen = [key.removeprefix(f"{benchmark}/") for key in wanted]
    unknown = [key for key in chosen if key not in keys]
    if unknown:
        raise UserError(f"unknown --metrics {unknown} for {benchmark}; its metric reports: {', '.join(keys)}")
    return chosen


def runs_table(
    runs: list[RunResult], keys: list[str], settings: BootstrapSettings, reference: RunResult | None
) -> str:
    """Each run's values with their intervals (and answer agreement with the unpruned reference)."""
    header = ["run", "strategy", *keys] + (["agrees with unpruned"] if reference is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for letter, run in zip(_letters(len(runs)), runs, strict=False):
        intervals = metric_intervals(run.parts(), settings)
        cells = [letter, run.label]
        cells += [_interval(intervals[key]) for key in keys]
        if reference is not None:  # the same questions (checked): agreement is over all of them
            cells.append(_interval(bootstrap_mean(agreement(run.rows, reference.rows), settings)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pair_table(pair: PairComparison, keys: list[str], level: float, names: tuple[str, str]) -> str:
    first, second = names
    header = ["value", first, second, f"{second} - {first}", f"{100 * level:.0f} % interval"]
    header += [f"McNemar p ({first} only / {second} only)", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        diff = pair.differences[key]
        test = (
            "-"
            if diff.mcnemar is None
            else f"{diff.mcnemar.p_value:.3g} ({diff.mcnemar.only_first} / {diff.mcnemar.only_second})"
        )
        interval = f"[{_fmt(diff.difference.low, True)}, {_fmt(diff.difference.high, True)}]"
        cells = [
            key,
            _fmt(diff.first),
            _fmt(diff.second),
            _fmt(diff.difference.estimate, True),
            interval,
            test,
        ]
        lines.append("| " + " | ".join([*cells, verdict(diff, level, names)]) + " |")
    lines.append(f"\nanswers agree on {_interval(pair.agreement)} of the {pair.questions} questions")
    if pair.overlap is not None:
        lines.append(f"kept image tokens overlap (mean Jaccard): {_interval(pair.overlap)}")
    return "\n".join(lines) + "\n"


def _interval(interval: Interval) -> str:
    return f"{interval.estimate:.4f} [{interval.low:.4f}, {interval.high:.4f}]"


def _letters(count: int) -> list[str]:
    return [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(count)]


def compare_runs(
    runs: list[RunResult], reference: RunResult | None, args: argparse.Namespace, settings: BootstrapSettings
) -> str:
    """The whole report: the runs with their intervals, then each run against the first."""
    first = runs[0]
    for run in [*runs[1:], *([reference] if reference is not None else [])]:
        check_comparable(first, run)
    keys = select_keys(list(first.parts().value()), args.metrics, first.benchmark_name)
    if reference is None:
        reference = next((run for run in runs if not run.prunes), None)
    letters = _letters(len(runs))
    parts = [
        f"{len(first.rows)} questions of {first.benchmark_name}; {100 * settings.level:.0f} % intervals from "
        f"{settings.resamples} bootstrap resamples (seed {settings.seed}); *: the data tell the runs apart\n",
        "\n".join(f"{letter}: {run.label}  ({run.path})" for letter, run in zip(letters, runs, strict=False)),
        "",
        runs_table(runs, keys, settings, reference),
    ]
    models = {str(run.config.model.name) for run in runs}
    if len(models) > 1:
        parts.append(f"note: the runs use different models ({', '.join(sorted(models))})\n")
    for letter, run in zip(letters[1:], runs[1:], strict=False):
        pair = compare_pair(first, run, settings)
        parts += [f"## {letter} against A\n", pair_table(pair, keys, settings.level, ("A", letter))]
    return "\n".join(parts)


def kept_rows_figure(runs: list[RunResult], out: Path) -> Path | None:
    """kept_rows.png: each pruned run's kept tokens by image row (None when no run pruned)."""
    from pore.app.viz.comparison import plot_kept_rows
    from pore.app.viz.runs import Run, kept_summary, model_grid

    summaries = []
    for run in runs:
        if not any(row.get("kept_visual_indices") for row in run.rows):
            continue
        try:
            grid = model_grid(run.config, run.rows)
        except ValueError as error:
            log.warning("%s: %s", run.path, error)
            continue
        summaries.append(kept_summary(Run(run.path, run.config, run.rows, run.label, grid)))
    return plot_kept_rows(summaries, out / "kept_rows.png") if summaries else None


def log_to_wandb(project: str, out: Path, tables: dict[str, str], figures: dict[str, Path]) -> None:
    import wandb

    run = wandb.init(project=project, job_type="compare", dir=str(out))
    run.log({f"compare/{name}": wandb.Html(f"<pre>{text}</pre>") for name, text in tables.items()})
    run.log({f"compare/{name}": wandb.Image(str(path)) for name, path in figures.items()})
    run.finish()


def pareto(args: argparse.Namespace, settings: BootstrapSettings) -> int:
    from pore.app.comparison.pareto import markdown, pareto_points, write_pareto

    runs = find_runs(args.pareto)
    points = pareto_points(runs, settings, args.metric, args.bench, args.bench_batch)
    out = args.out or args.pareto
    paths = write_pareto(points, out)
    print(markdown(points))
    print(f"{len(points)} runs: {paths['figure']}, {paths['table']}, {paths['csv']}")
    if args.wandb:
        log_to_wandb(args.project, out, {"pareto": markdown(points)}, {"pareto": paths["figure"]})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    with user_errors():
        try:
            settings = BootstrapSettings(args.resamples, args.seed, args.level)
        except ValueError as error:
            raise UserError(str(error).replace("bootstrap.", "--")) from None
        if args.pareto is not None:
            return pareto(args, settings)
        if len(args.runs) < 2:
            raise UserError("give at least two run folders to compare (or --pareto FOLDER)")
        runs = [load_result(path) for path in args.runs]
        reference = load_result(args.reference) if args.reference is not None else None
        report = compare_runs(runs, reference, args, settings)
        print(report)
        out = args.out or runs[0].path / "compare"
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(report)
        figures = {}
        figure = kept_rows_figure(runs, out)
        if figure is not None:
            figures["kept_rows"] = figure
        print(f"written: {out / 'compare.md'}" + "".join(f", {path}" for path in figures.values()))
        if args.wandb:
            log_to_wandb(args.project, out, {"runs": report}, figures)
    return 0
