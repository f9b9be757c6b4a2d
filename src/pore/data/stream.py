"""A benchmark as a torch IterableDataset: each sample exactly once across ranks and dataloader workers.

Every (rank, worker) pair reads a disjoint part of the stream: `datasets.distributed.split_dataset_by_node`
over rank x worker (whole parquet shards when they divide evenly, every n-th row otherwise). With
`limit`, the first `limit` rows of the benchmark are taken first and dealt out round-robin. Rows whose
question id is already in the output (a resumed run) are skipped before any image is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import datasets
import fsspec
import torch
from datasets.distributed import split_dataset_by_node

from pore.data.benchmark import Benchmark, Sample, SampleError
from pore.data.loading import column_names, open_stream


@dataclass
class FailedSample:
    """A row that could not be used (e.g. an unreadable image): recorded in the predictions, then skipped."""

    question_id: str
    error: str


@dataclass
class StreamSource:
    """Where a benchmark's rows come from."""

    path: str
    config: str | None
    split: str
    limit: int | None = None


def all_rows(stream: datasets.IterableDataset) -> Iterator[dict]:
    """Every row of `stream`, also inside a dataloader worker.

    Iterated in a worker, a `datasets` stream keeps only that worker's share of its parquet shards (and none
    when there are fewer shards than workers). BenchmarkStream splits across ranks and workers itself, and
    GQA's image table must be whole in every worker, so a worker reads through `iter()`, which does not split.
    """
    if torch.utils.data.get_worker_info() is None:
        yield from stream
        return
    fsspec.asyn.reset_lock()  # as datasets does in a worker: no event loop lock inherited from the parent
    for batch in stream.iter(batch_size=1):
        yield {key: values[0] for key, values in batch.items()}


class BenchmarkStream(torch.utils.data.IterableDataset):
    def __init__(
        self,
        benchmark: Benchmark,
        source: StreamSource,
        skip_ids: frozenset[str] = frozenset(),
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.benchmark, self.source, self.skip_ids = benchmark, source, skip_ids
        self.rank, self.world_size = rank, world_size
        self._prepared = False

    def check(self) -> None:
        """Fail early, in the main process, when the data lacks a column the benchmark needs."""
        self.benchmark.check_columns(
            column_names(open_stream(self.source.path, self.source.config, self.source.split))
        )

    def _part(self) -> tuple[int, int]:
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return self.rank * workers + worker_id, self.world_size * workers

    def _rows(self) -> Iterator[dict]:
        source = self.source
        stream = open_stream(source.path, source.config, source.split)
        part, parts = self._part()
        if source.limit is not None:
            wanted = (row for row in all_rows(stream) if self.benchmark.keep_row(row))
            for index, row in enumerate(islice(wanted, source.limit)):
                if index % parts == part:
                    yield row
            return
        for row in all_rows(split_dataset_by_node(stream, rank=part, world_size=parts)):
            if self.benchmark.keep_row(row):
                yield row

    def __iter__(self) -> Iterator[Sample | FailedSample]:
        if not self._prepared:
            src = self.source
            self.benchmark.prepare(lambda config, split: all_rows(open_stream(src.path, config, split)))
            self._prepared = True
        for row in self._rows():
            question_id = self.benchmark.question_id(row)
            if question_id in self.skip_ids:
                continue
            try:
                yield self.benchmark.to_sample(row)
            except SampleError as error:
                yield FailedSample(question_id, str(error))
