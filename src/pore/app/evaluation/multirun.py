"""`python src/run.py --multirun ...` ends with one table: a row per job (its overrides, the benchmark's main
metric with its interval, the efficiency numbers), printed and written to `<sweep dir>/summary.csv` and
`summary.md`.

A Hydra callback (conf/config.yaml, `hydra.callbacks.summary`). The files are rewritten after every job, so
they are there even when Hydra stops the sweep at a job that crashed. A job that failed on a bad setting
(a `UserError`) is a row with its message; the sweep then exits with status 2 after the table.

At the end, each job is compared with the best job of its benchmark on the same questions (paired
difference, its interval, whether the data tell them apart: `pore.app.comparison.summary`), its answers with
the unpruned job's when there is one, and the Pareto front of accuracy against prefill TFLOPs is drawn
(`pareto.png`, `pareto.md`); with `logger=wandb` the table and the figure also go to a W&B run.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pore.app.evaluation.uncertainty import HIGH, LOW, headline_key, interval_key, statistics_settings
from pore.errors import USER_ERROR_EXIT, UserError

log = logging.getLogger("pore")

EFFICIENCY = ("eff/visual_tokens", "eff/prefill_tflops", "eff/sec_per_sample", "eff/samples_per_sec")
# ci_low / ci_high: the value's bootstrap interval; seed_sd: its spread over seeds (a `seeds=[...]` job)
VALUE = ("metric", "value", "ci_low", "ci_high", "seed_sd")
COMPARISON = ("vs_best", "vs_best_ci", "differs_from_best", "agrees_with_unpruned")
FIDELITY = ("fid/first_token_kl", "fid/first_token_top1")
COLUMNS = ("job", "overrides", "status", *VALUE, *EFFICIENCY, *COMPARISON, *FIDELITY, "output_dir")
FAILED_KEY = "error"  # what a job that failed on a user error returns: {"error": message}


def main_metric(metrics: dict[str, Any]) -> tuple[str, Any]:
    """The benchmark's headline value: the first metric after its sample counts (see report.py)."""
    key = headline_key(metrics)
    return ("", None) if key is None else (key, metrics[key])


def job_row(number: int, job_return: JobReturn, output_dir: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row.update(job=number, overrides=list(job_return.overrides or []), output_dir=output_dir)
    if job_return.status != JobStatus.COMPLETED:
        error = job_return._return_value
        row["status"] = f"failed: {type(error).__name__}: {error}"
        return row
    value = job_return.return_value
    if isinstance(value, dict) and FAILED_KEY in value:
        row["status"] = f"failed: {value[FAILED_KEY]}"
        return row
    metrics = value if isinstance(value, dict) else {}
    row["status"] = "ok" if metrics else "no metrics"
    row["metric"], row["value"] = main_metric(metrics)
    if row["metric"]:
        row["ci_low"] = metrics.get(interval_key(row["metric"], LOW), "")
        row["ci_high"] = metrics.get(interval_key(row["metric"], HIGH), "")
        row["seed_sd"] = metrics.get(f"{row['metric']}/seed_sd", "")
    for key in (*EFFICIENCY, *FIDELITY):
        row[key] = metrics.get(key, "")
    return row


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def varying(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with only the overrides that differ between jobs (those of every job say nothing)."""
    shared = set.intersection(*(set(row["overrides"]) for row in rows)) if len(rows) > 1 else set()
    return [{**row, "overrides": " ".join(o for o in row["overrides"] if o not in shared)} for row in rows]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[key]) for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(folder: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    rows = varying(rows)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / "summary.csv", folder / "summary.md"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown(rows), encoding="utf-8")
    return csv_path, md_path


class MultirunSummary(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.folder: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows, self.folder = [], Path(str(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.folder is None:  # a single run: nothing to combine
            return
        number = int(config.hydra.job.get("num", len(self.rows)))
        self.rows.append(job_row(number, job_return, str(config.get("output_dir", ""))))
        write_summary(self.folder, self.rows)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.folder is None or not self.rows:
            return
        try:
            compare_jobs(self.folder, self.rows, config)
        except UserError as error:  # bad statistics settings: each job already said so
            log.warning("no comparison of the jobs: %s", error)
        csv_path, md_path = write_summary(self.folder, self.rows)
        print(
            f"\n{len(self.rows)} jobs:\n{markdown(varying(self.rows))}summary: {csv_path} and {md_path}",
            flush=True,
        )
        failed = [row for row in self.rows if row["status"].startswith("failed")]
        if failed:
            print(f"{len(failed)} of {len(self.rows)} jobs failed (see the status column)", flush=True)
            raise SystemExit(USER_ERROR_EXIT)


def compare_jobs(folder: Path, rows: list[dict[str, Any]], config: DictConfig) -> None:
    """Fill the comparison columns of `rows` and draw the Pareto front of the finished jobs in `folder`."""
    from pore.app.comparison.pareto import pareto_points, write_pareto
    from pore.app.comparison.runs import is_run_folder, load_result
    from pore.app.comparison.summary import versus_best

    settings = statistics_settings(config).bootstrap
    folders = [
        Path(row["output_dir"]) if row["status"] == "ok" and row["output_dir"] else None for row in rows
    ]
    for index, result in versus_best(folders, settings).items():
        rows[index].update(result.columns(settings.level))
    # A `seeds=[...]` job's folder holds one run per seed: each is a point of the front.
    found = [[path] if is_run_folder(path) else sorted(path.glob("seed*")) for path in folders if path]
    runs = [load_result(path) for paths in found for path in paths if is_run_folder(path)]
    if not runs:
        return
    paths = write_pareto(pareto_points(runs, settings), folder)
    print(f"Pareto front: {paths['figure']} and {paths['table']}", flush=True)
    if str(config.logger.kind) == "wandb":
        log_summary_to_wandb(config, folder, rows, paths["figure"])


def log_summary_to_wandb(config: DictConfig, folder: Path, rows: list[dict[str, Any]], figure: Path) -> None:
    """One W&B run (job type `multirun-summary`) with the summary table and the Pareto figure."""
    import wandb

    logger = config.logger
    run = wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=logger.group,
        job_type="multirun-summary",
        dir=str(folder),
        mode=str(logger.mode),
    )
    shown = varying(rows)
    table = wandb.Table(columns=list(COLUMNS), data=[[_cell(row[key]) for key in COLUMNS] for row in shown])
    run.log({"multirun/summary": table, "multirun/pareto": wandb.Image(str(figure))})
    run.finish()
