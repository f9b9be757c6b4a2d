"""One evaluation run: config -> model, pruning strategy, benchmark stream -> predictions, metrics, logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from pore import config as build
from pore.adapters import adapter_for
from pore.data import BenchmarkDataModule
from pore.data.protocol import processor_pads
from pore.evaluation import LiveMetricProgressBar, PredictionWriter, VLMEvaluator
from pore.evaluation import predictions as prediction_files
from pore.evaluation.report import FinalMetrics, summary_table

log = logging.getLogger("pore")


class SettingsMismatchError(RuntimeError):
    """The output folder holds a run with other settings: resuming into it would mix two experiments."""


def check_resumable(cfg: DictConfig, output_dir: Path) -> None:
    saved_path = output_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = OmegaConf.load(saved_path)
    for key in build.RUN_IDENTITY:
        # .get: folders written before a setting existed (e.g. `protocol`) have no value for it.
        ours = (
            OmegaConf.to_container(cfg[key], resolve=True)
            if isinstance(cfg.get(key), DictConfig)
            else cfg.get(key)
        )
        theirs = (
            OmegaConf.to_container(saved[key], resolve=True)
            if isinstance(saved.get(key), DictConfig)
            else saved.get(key)
        )
        if isinstance(ours, dict):
            for logistics in build.DATA_LOGISTICS if key == "data" else ():
                ours.pop(logistics, None)
                theirs.pop(logistics, None)
        if ours != theirs:
            raise SettingsMismatchError(
                f"{output_dir} holds a run with other `{key}` settings ({theirs} there, {ours} now); "
                "choose another output_dir, or delete that folder to start over"
            )


def evaluate(cfg: DictConfig) -> dict[str, Any] | None:
    """Run the evaluation; returns the final metrics on global rank 0 (None on other ranks)."""
    strategy = build.build_strategy(cfg)
    strategy.validate()
    benchmark, source = build.build_benchmark(cfg)
    output_dir = Path(str(cfg.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(cfg, output_dir)
    if build.is_first_process():
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, processor = build.load_model_and_processor(cfg)
    protocol = build.build_protocol(cfg)
    # What the protocol does for this model family and benchmark (pore.data.protocol).
    family = adapter_for(model, cfg.model.adapter).name
    pad_to_square = protocol.pads(benchmark.name, family)
    images_padded = pad_to_square or processor_pads(processor.image_processor)
    max_new_tokens = (
        protocol.tokens(benchmark.name) if cfg.max_new_tokens is None else int(cfg.max_new_tokens)
    )
    module = VLMEvaluator(
        model,
        processor,
        strategy,
        benchmark,
        max_new_tokens=max_new_tokens,
        adapter=cfg.model.adapter,
        images_padded=images_padded,
    )
    skip = prediction_files.done_ids(output_dir)
    datamodule = BenchmarkDataModule(
        benchmark,
        source,
        processor,
        int(cfg.data.batch_size),
        int(cfg.data.num_workers),
        skip_ids=skip,
        conversation=protocol.conversation_for(family),
        pad_to_square=pad_to_square,
    )
    datamodule.check()
    if skip:
        log.info("resuming in %s: %d questions already answered are skipped", output_dir, len(skip))

    logger = build.build_logger(cfg, output_dir)
    figures = None
    if strategy.prunes:
        # Kept tokens by row / by cell and a few sample pictures in <output_dir>/figures (pore.viz).
        def figures(rows: list[dict[str, Any]]) -> dict[str, Path]:
            from pore.viz import run_figures

            return run_figures(cfg, output_dir, rows, processor)

    final = FinalMetrics(benchmark, str(cfg.data.name), output_dir, figures)
    trainer = build.build_trainer(cfg, logger, [PredictionWriter(output_dir), final, LiveMetricProgressBar()])
    build.share_cpu_threads(trainer)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    if cfg.logger.kind == "wandb":
        import wandb

        wandb.finish()
    title = f"{cfg.model.name} | {cfg.data.name} | {strategy.name} | protocol {protocol.name} "
    title += f"({strategy.method}, prior {strategy.prior.name})"
    print(summary_table(final.metrics, title))
    print(f"predictions, metrics and config in {output_dir}")
    if final.figure_paths:
        print(f"pictures in {output_dir / 'figures'}: {', '.join(sorted(final.figure_paths))}")
    return final.metrics
