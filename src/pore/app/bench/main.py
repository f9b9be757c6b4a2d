"""Config in, report out: what `python src/bench.py` does once Hydra has composed conf/bench.yaml."""

from __future__ import annotations

import dataclasses
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pore import UnknownNameError, adapter_class_for_config, build_strategy
from pore.app.bench.architecture import Architecture, resolve_architecture
from pore.app.bench.report import build_report, render, write_report
from pore.app.bench.runner import Runner
from pore.app.bench.settings import BenchSettings
from pore.app.bench.workload import image_geometry
from pore.errors import UserError, one_line

log = logging.getLogger("pore.bench")


def default_output(architecture: str, device: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("outputs") / "bench" / f"{architecture}-{device}-{stamp}.json")


class CellsFailed(Exception):
    """Some settings of the sweep failed (an error, not out of memory): the report is written, the command
    exits non-zero."""


def failed_cells(report: dict[str, Any]) -> list[str]:
    """`<setting> (<phase>): <error>` for every setting whose prefill or generation raised an error."""
    lines = []
    for record in report["results"]:
        for phase, key in (("prefill", "status"), ("generate", "generate_status")):
            if record.get(key) == "error":
                name = record["approach"] + (f":{record['strategy']}" if record.get("strategy") else "")
                setting = f"batch={record['batch']} {record['implementation']} {name} keep={record['budget']}"
                lines.append(f"{setting} ({phase}): {record.get('error') or 'error'}")
    return lines


def check_plan(settings: BenchSettings, architecture: Architecture) -> None:
    """What can be wrong with the settings for this model, said before the model is built."""
    config = architecture.config
    family = adapter_class_for_config(config).name
    if family != "llava":
        # The workload writes LLaVA-1.5's prompt: one fixed grid of image_size / patch_size squared tokens.
        raise UserError(
            f"bench.py builds LLaVA-1.5-shaped prompts (one image of a fixed token grid); "
            f"{architecture.name} is a {family} model, whose prompts it does not build yet: benchmark a "
            "LLaVA-1.5 architecture "
            "(bench.architecture=llava15_7b, llava15_small, or a LLaVA-1.5 checkpoint folder)"
        )
    image_tokens = image_geometry(config)[0]
    if not any(budget < image_tokens for budget in settings.budgets):
        raise UserError(
            f"bench.budgets={list(settings.budgets)}: none is below the {image_tokens} image tokens of "
            f"{architecture.name}, so nothing pruned would be measured; e.g. bench.budgets="
            f"[{image_tokens},{max(1, image_tokens // 4)}]"
        )
    layers = int(config.get_text_config().num_hidden_layers)
    if not 0 < settings.layer < layers:
        raise UserError(
            f"bench.layer must be in 1..{layers - 1} for this {layers}-layer model, got {settings.layer}"
        )
    for name in settings.strategies:
        budget = min(settings.budgets)
        try:
            build_strategy(name, keep=budget, layer=settings.layer).resolve(
                adapter_class_for_config(config).facts(config)
            )
        except UnknownNameError as error:
            raise UserError(f"bench.strategies: {error}") from None
        except ValueError as error:
            raise UserError(
                f"bench.strategies: {name!r} cannot prune before the one layer bench.layer={settings.layer} "
                f"({error}); the benchmark times single-layer strategies such as fastv, pore_linear"
            ) from None


def run_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Build, measure, write `bench.output` (JSON) and the Markdown table beside it; returns the report.
    Raises `CellsFailed` (after writing the report) when a setting failed with an error."""
    raw = OmegaConf.to_container(cfg.bench, resolve=True)
    model = cfg.model
    path = model.get("path")
    try:
        settings = BenchSettings.from_mapping(raw)
        architecture = resolve_architecture(
            settings.architecture, str(model.name), None if path is None else str(path)
        )
        device = settings.torch_device()
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as error:
        raise UserError(one_line(error)) from error
    check_plan(settings, architecture)
    output = settings.output or default_output(architecture.name, device.type)
    settings = dataclasses.replace(settings, output=output)
    runner = Runner(settings, architecture)
    try:
        runner._check_fits()  # the weights must fit the device: said before anything is built
    except RuntimeError as error:
        raise UserError(one_line(error)) from None
    log.info(
        "benchmarking %s (%s) on %s: batches %s, budgets %s, K = %d",
        architecture.name,
        architecture.source,
        device,
        list(settings.batch_sizes),
        list(settings.budgets),
        settings.layer,
    )
    report = build_report(runner.run(), runner.device, settings.targets)
    json_path, table_path = write_report(report, output)
    print(render(report, warnings=False))  # the warnings go to stderr, below
    print(f"\nreport: {json_path}\ntable:  {table_path}")
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    failed = failed_cells(report)
    if failed:
        raise CellsFailed(
            f"{len(failed)} of {len(report['results'])} benchmark settings failed (their rows say 'error'; "
            f"the rest of {json_path} is valid):\n" + "\n".join(f"  {line}" for line in failed)
        )
    return report


def bench(cfg: DictConfig) -> None:
    """The program `python src/bench.py`: a failed setting is listed and the command exits 1 (user errors
    exit 2, through `pore.app.cli.main`)."""
    try:
        run_from_config(cfg)
    except CellsFailed as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
