"""Config in, report out: what `python src/bench.py` does once Hydra has composed conf/bench.yaml."""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pore.bench.architecture import resolve_architecture
from pore.bench.report import build_report, render, write_report
from pore.bench.runner import Runner
from pore.bench.settings import BenchSettings

log = logging.getLogger("pore.bench")
REPOSITORY = Path(__file__).resolve().parents[3]


def _asset_path(name: str) -> str:
    # The same rule as pore.config.asset_path. Not imported from there: pore.config pulls in the data stack
    # (datasets, lightning), which the benchmark does not need and the GPU machines do not have.
    root = os.environ.get("PORE_ASSETS") or str(REPOSITORY / "assets")
    return str(Path(root) / name)


def register_resolvers() -> None:
    """The resolvers that conf/model/*.yaml use (`${asset:...}`)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset_path)


def default_output(architecture: str, device: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("outputs") / "bench" / f"{architecture}-{device}-{stamp}.json")


def run_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Build, measure, write `bench.output` (JSON) and the Markdown table beside it; returns the report."""
    raw = OmegaConf.to_container(cfg.bench, resolve=True)
    settings = BenchSettings.from_mapping(raw)
    model = cfg.model
    path = model.get("path")
    architecture = resolve_architecture(
        settings.architecture, str(model.name), None if path is None else str(path)
    )
    device = settings.torch_device()
    output = settings.output or default_output(architecture.name, device.type)
    settings = dataclasses.replace(settings, output=output)
    log.info(
        "benchmarking %s (%s) on %s: batches %s, budgets %s, K = %d",
        architecture.name,
        architecture.source,
        device,
        list(settings.batch_sizes),
        list(settings.budgets),
        settings.layer,
    )
    runner = Runner(settings, architecture)
    report = build_report(runner.run(), runner.device, settings.targets)
    json_path, table_path = write_report(report, output)
    print(render(report))
    print(f"\nreport: {json_path}\ntable:  {table_path}")
    return report
