"""One evaluation run: config -> model, pruning strategy, benchmark stream -> predictions, metrics, logs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from pore.adapters import adapter_for
from pore.app import config as build
from pore.app import identity
from pore.app.evaluation import LiveMetricProgressBar, PredictionWriter, VLMEvaluator
from pore.app.evaluation import predictions as prediction_files
from pore.app.evaluation.datamodule import BenchmarkDataModule
from pore.app.evaluation.lock import RunLock
from pore.app.evaluation.noise import quiet_lightning
from pore.app.evaluation.report import (
    FailedSamplesError,
    FinalMetrics,
    failure_message,
    max_failed_share,
    summary_table,
)
from pore.app.evaluation.runlog import RunLog, run_log
from pore.app.evaluation.seeds import evaluate_over_seeds, wants_seeds
from pore.app.evaluation.uncertainty import Statistics, statistics_settings
from pore.app.preflight import RunPlan, preflight
from pore.assets import portable
from pore.data.protocol import processor_pads
from pore.errors import UserError
from pore.strategy import Strategy

log = logging.getLogger("pore")
IDENTITY = "identity.json"
HYDRA_RECORD = ".hydra"


class SettingsMismatchError(UserError):
    """The output folder holds a run with other settings: resuming into it would mix two experiments."""


def _identity(node: Any, key: str) -> Any:
    """The answer-changing settings under `key`, comparable across checkouts (asset paths relative)."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if isinstance(plain, dict) and key == "data":
        plain = {name: value for name, value in plain.items() if name not in identity.DATA_LOGISTICS}
    return portable(plain)


def differences(old: Any, new: Any, prefix: str) -> list[str]:
    """`dotted.key: old -> new` for every leaf that differs (a key missing on one side shows as <unset>)."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            missing = "<unset>"
            lines += differences(old.get(key, missing), new.get(key, missing), f"{prefix}.{key}")
        return lines
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The settings that change the answers, portable (asset paths relative) and as JSON reads them."""
    return json.loads(json.dumps({key: _identity(cfg.get(key), key) for key in identity.RUN_IDENTITY}))


def write_run_config(cfg: DictConfig, output_dir: Path, strategy: Strategy) -> None:
    """config.yaml (the resolved config, for people), identity.json (what a resume is checked against: the
    same in a moved checkout) and strategy.json (the strategy the engine runs, resolved for the model)."""
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (output_dir / IDENTITY).write_text(json.dumps(run_identity(cfg), indent=1, sort_keys=True) + "\n")
    ran = portable(dataclasses.asdict(strategy))
    (output_dir / prediction_files.STRATEGY_FILE).write_text(json.dumps(ran, indent=1, default=str) + "\n")


def check_resumable(cfg: DictConfig, output_dir: Path) -> None:
    """Refuse to resume a folder whose answered questions came from other settings.

    A folder without any answered question is free: its stored config (e.g. of a run that crashed before
    answering) is simply replaced."""
    identity_path, saved_path = output_dir / IDENTITY, output_dir / "config.yaml"
    if not (identity_path.exists() or saved_path.exists()) or not prediction_files.done_ids(output_dir):
        return
    if identity_path.exists():
        saved = json.loads(identity_path.read_text())
    else:  # a folder written before identity.json existed
        saved = run_identity(OmegaConf.load(saved_path))
    ours = run_identity(cfg)
    changed = []
    for key in identity.RUN_IDENTITY:
        changed += differences(saved.get(key), ours.get(key), key)
    if changed:
        raise SettingsMismatchError(
            f"{output_dir} holds a run with other settings ({'; '.join(changed)}); "
            "choose another output_dir, or delete that folder to start over"
        )


def write_hydra_record(cfg: DictConfig, output_dir: Path) -> None:
    """`.hydra/`: the composed config (interpolations kept), the command-line overrides and Hydra's own
    settings, as Hydra writes them (conf/config.yaml turns Hydra's writing off: it would write them before
    the run's checks, into a folder the run may not own)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    record = output_dir / HYDRA_RECORD
    record.mkdir(exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save({"hydra": hydra_cfg}, record / "hydra.yaml")
    OmegaConf.save(list(hydra_cfg.overrides.task), record / "overrides.yaml")


@contextlib.contextmanager
def hold_folder(output_dir: Path) -> Iterator[None]:
    """The run's folder, created, with its lock held by global rank 0 for the block (one writer)."""
    lock = RunLock(output_dir) if build.is_first_process() else None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if lock is not None:
            lock.acquire()
    except OSError as error:
        raise UserError(
            f"cannot write into output_dir {output_dir} ({error.strerror or error}); choose a folder you can "
            "write to"
        ) from None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Run the evaluation; returns the final metrics on global rank 0 (None on other ranks).

    Everything checkable without the weights is checked first (`pore.app.preflight`); then global rank 0 takes
    the folder's lock (one writer per folder) for the whole run. The run's files (config.yaml, .hydra/,
    run.log, ...) are written once the model is loaded and the trainer built, so that a run failing before
    that point leaves an existing folder as it was. With `seeds=[...]`, a stochastic strategy runs once per
    seed (`pore.app.evaluation.seeds`)."""
    if wants_seeds(cfg):
        return evaluate_over_seeds(cfg, evaluate)
    quiet_lightning()
    with run_log(enabled=build.is_first_process()) as log_file:
        plan = preflight(cfg)
        statistics = statistics_settings(cfg)
        output_dir = Path(str(cfg.output_dir))
        with hold_folder(output_dir):
            return _evaluate(cfg, plan, output_dir, log_file, statistics)


@dataclasses.dataclass
class Prepared:
    """A run ready to predict: nothing of it written to its folder yet."""

    trainer: L.Trainer
    module: VLMEvaluator
    datamodule: BenchmarkDataModule
    final: FinalMetrics
    logger: Any
    protocol: Any
    skip: frozenset[str]


def prepare(cfg: DictConfig, plan: RunPlan, output_dir: Path, statistics: Statistics) -> Prepared:
    """The model, the data module, the callbacks and the trainer of the run (the weights load here)."""
    strategy, benchmark, source = plan.strategy, plan.benchmark, plan.source
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, processor = build.load_model_and_processor(cfg)
    protocol = build.build_protocol(cfg)
    # What the protocol does for this benchmark (its data config's variant) and model (pore.data.protocol):
    # padding where the family can encode padded squares, the conversation the protocol names for the family.
    variant = build.build_benchmark_protocol(cfg)
    adapter = adapter_for(model, cfg.model.adapter)
    pad_to_square = variant.pads(adapter.pads_to_square)
    images_padded = pad_to_square or processor_pads(processor.image_processor)
    max_new_tokens = variant.max_new_tokens if cfg.max_new_tokens is None else int(cfg.max_new_tokens)
    module = VLMEvaluator(
        model,
        processor,
        strategy,
        benchmark,
        max_new_tokens=max_new_tokens,
        adapter=cfg.model.adapter,
        images_padded=images_padded,
        fidelity=statistics.fidelity,
    )
    skip = prediction_files.done_ids(output_dir)
    datamodule = BenchmarkDataModule(
        benchmark,
        source,
        processor,
        int(cfg.data.batch_size),
        int(cfg.data.num_workers),
        skip_ids=skip,
        conversation=protocol.conversation_for(adapter.name),
        pad_to_square=pad_to_square,
    )
    logger = build.build_logger(cfg, output_dir)
    figures = None
    if strategy.prunes:
        # Kept tokens by row / by cell and a few sample pictures in <output_dir>/figures (pore.app.viz).
        def figures(rows: list[dict[str, Any]]) -> dict[str, Path]:
            from pore.app.viz import run_figures

            return run_figures(cfg, output_dir, rows, processor, dataclasses.asdict(strategy))

    progress = LiveMetricProgressBar(plan.questions, len(skip), int(cfg.data.batch_size))
    final = FinalMetrics(benchmark, str(cfg.data.name), output_dir, figures, statistics)
    trainer = build.build_trainer(cfg, logger, [PredictionWriter(output_dir), final, progress])
    build.share_cpu_threads(trainer)
    return Prepared(trainer, module, datamodule, final, logger, protocol, skip)


def _evaluate(
    cfg: DictConfig, plan: RunPlan, output_dir: Path, log_file: RunLog, statistics: Statistics
) -> dict[str, Any] | None:
    check_resumable(cfg, output_dir)
    run = prepare(cfg, plan, output_dir, statistics)
    if build.is_first_process():  # the run starts: from here on the folder is this run's
        write_run_config(cfg, output_dir, plan.strategy)
        write_hydra_record(cfg, output_dir)
        log_file.start(output_dir)
    log.info(
        "evaluating %s on %s (%s questions) with strategy %s, protocol %s, into %s",
        cfg.model.name,
        cfg.data.name,
        "an unknown number of" if plan.questions is None else plan.questions,
        plan.strategy.name,
        run.protocol.name,
        output_dir,
    )
    if run.skip:
        log.info("resuming in %s: %d questions already answered are skipped", output_dir, len(run.skip))
    if run.logger:
        run.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    run.trainer.predict(run.module, datamodule=run.datamodule, return_predictions=False)
    if not run.trainer.is_global_zero:
        return None
    return report(cfg, plan, run, output_dir, log_file)


def report(
    cfg: DictConfig, plan: RunPlan, run: Prepared, output_dir: Path, log_file: RunLog
) -> dict[str, Any]:
    """The summary (console and run.log) on rank 0; fails the run when too many samples failed."""
    if cfg.logger.kind == "wandb":
        import wandb

        wandb.finish()
    strategy, final = plan.strategy, run.final
    title = f"{cfg.model.name} | {cfg.data.name} | {strategy.name} | protocol {run.protocol.name} "
    title += f"({strategy.method}, prior {strategy.prior.name})"
    table = summary_table(final.metrics, title)
    print(table)
    log_file.write(table)
    log.info("predictions, metrics and config in %s", output_dir)
    if final.figure_paths:
        log.info("pictures in %s: %s", output_dir / "figures", ", ".join(sorted(final.figure_paths)))
    problem = failure_message(final.rows, max_failed_share(cfg), output_dir)
    if problem:
        log_file.write(f"error: {problem}")
        raise FailedSamplesError(problem)
    return final.metrics
