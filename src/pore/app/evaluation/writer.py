"""Lightning callback: write each batch's rows as soon as it is predicted; merge ranks at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from pore.app.evaluation import predictions


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.path: Path | None = None
        self.samples = 0
        self.started = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = predictions.rank_file(self.output_dir, trainer.global_rank)
        predictions.cut_torn_tail(self.path)
        self.samples, self.started = 0, time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        predictions.append_rows(self.path, prediction)
        self.samples += sum(1 for row in prediction if row.get("error") is None)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = {
            "samples": self.samples,
            "seconds": time.perf_counter() - self.started,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30
            if torch.cuda.is_available()
            else None,
        }
        (self.output_dir / f"stats.rank{trainer.global_rank}.json").write_text(json.dumps(stats))
        trainer.strategy.barrier("pore-predictions-written")
        if trainer.is_global_zero:
            predictions.merge(self.output_dir)
        trainer.strategy.barrier("pore-predictions-merged")


def read_rank_stats(output_dir: Path) -> list[dict[str, Any]]:
    """The per-rank statistics of the last run (and remove their files)."""
    stats = []
    for path in sorted(output_dir.glob("stats.rank*.json")):
        stats.append(json.loads(path.read_text()))
        path.unlink()
    return stats
