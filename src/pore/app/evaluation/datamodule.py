"""The LightningDataModule for predict-only evaluation on a streamed benchmark."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from pore.data.benchmark import Benchmark
from pore.data.collate import PromptCollator
from pore.data.stream import BenchmarkStream, StreamSource


class BenchmarkDataModule(L.LightningDataModule):
    def __init__(
        self,
        benchmark: Benchmark,
        source: StreamSource,
        processor: Any,
        batch_size: int = 8,
        num_workers: int = 0,
        skip_ids: frozenset[str] = frozenset(),
        conversation: str | None = None,
        pad_to_square: bool = False,
    ) -> None:
        super().__init__()
        self.conversation, self.pad_to_square = conversation, pad_to_square
        self.benchmark, self.source, self.processor = benchmark, source, processor
        self.batch_size, self.num_workers, self.skip_ids = batch_size, num_workers, skip_ids

    def check(self) -> None:
        BenchmarkStream(self.benchmark, self.source).check()

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = BenchmarkStream(self.benchmark, self.source, self.skip_ids, rank=rank, world_size=world_size)
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=PromptCollator(self.processor, self.conversation, self.pad_to_square),
        )
