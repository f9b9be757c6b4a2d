"""A progress bar with a total and an ETA, showing the running accuracy of the samples answered so far
(in a one-process run; with several processes, none: see `shown_postfix`).

The benchmark is a stream (no `len`), so Lightning alone shows `0/?`. The run counts its questions before
the weights load (`pore.data.loading.count_rows`: parquet metadata of a local folder, or `data.limit`) and
the bar gets that many batches on this rank; a stream from a hub id has no known length, then the bar says
so instead of an ETA.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger("pore")


def batches_for(total: int | None, skipped: int, world_size: int, batch_size: int) -> int | None:
    """Batches one rank predicts for `total` questions, `skipped` of them already answered (an estimate
    within a batch per dataloader worker; None when the total is unknown)."""
    if total is None:
        return None
    remaining = max(0, total - skipped)
    return math.ceil(math.ceil(remaining / max(1, world_size)) / max(1, batch_size))


def shown_postfix(postfix: dict[str, str], world_size: int) -> dict[str, str]:
    """The running figures the bar shows: this process's are the run's only when it is the only process.
    With several (DDP), rank 0 has answered only its share of the questions, so its accuracy is not the
    run's: the bar shows none (the summary at the end gives the run's, from every rank's rows)."""
    return dict(postfix) if world_size == 1 else {}


class LiveMetricProgressBar(TQDMProgressBar):
    def __init__(self, total_questions: int | None = None, skipped: int = 0, batch_size: int = 1) -> None:
        super().__init__()
        self.total_questions, self.skipped, self.batch_size = total_questions, skipped, batch_size

    @property
    def total_predict_batches_current_dataloader(self) -> int | float:
        batches = batches_for(self.total_questions, self.skipped, self.trainer.world_size, self.batch_size)
        return super().total_predict_batches_current_dataloader if batches is None else batches

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        if self.total_questions is None and trainer.is_global_zero:
            log.info(
                "the number of questions is not known before streaming (a hub id, or a benchmark subset "
                "without data.limit): the progress bar has no total or ETA"
            )

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_predict_batch_start(trainer, pl_module, *args)
        if self.total_questions is None and self.predict_progress_bar is not None:
            self.predict_progress_bar.set_description("Predicting (total unknown)", refresh=False)

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if hasattr(pl_module, "live_postfix") and self.predict_progress_bar is not None:
            shown = shown_postfix(pl_module.live_postfix(), trainer.world_size)
            self.predict_progress_bar.set_postfix(shown, refresh=False)
