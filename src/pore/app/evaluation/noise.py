"""Lightning's messages that say nothing about an evaluation run, filtered so that the log shows the run.

- "💡 Tip: For seamless cloud logging ... litlogger": an advertisement, logged by every Trainer built
  with a logger other than LitLogger (lightning.pytorch.trainer.connectors.logger_connector);
- "`isinstance(treespec, LeafSpec)` is deprecated": a FutureWarning of torch >= 2.10 about Lightning's own
  use of torch's pytree API (lightning.pytorch.utilities._pytree), nothing a user can change;
- "Couldn't infer the batch indices fetched from your dataloader": the benchmark is a stream (an
  IterableDataset, without a batch sampler), so there are no indices to infer; the prediction writer does
  not use them (rows carry their question ids).
"""

from __future__ import annotations

import logging
import warnings

WARNINGS = (
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r".*Couldn't infer the batch indices fetched from your dataloader"),
)
LOGGED = ("💡 Tip: For seamless cloud",)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LOGGED)


_TIPS = _DropTips()


def quiet_lightning() -> None:
    """Filter the messages above (idempotent); every other warning and message of Lightning stays."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _TIPS not in logger.filters:
            logger.addFilter(_TIPS)
