"""A progress bar that shows the running accuracy of the samples answered so far (on this rank)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class LiveMetricProgressBar(TQDMProgressBar):
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
            self.predict_progress_bar.set_postfix(pl_module.live_postfix(), refresh=False)
