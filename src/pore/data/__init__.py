"""Benchmarks (registered by name), streaming and batching."""

from pore.data import benchmarks as _benchmarks  # noqa: F401  (registers the built-in benchmarks)
from pore.data.benchmark import BENCHMARKS, Benchmark, DataError, Sample, SampleError
from pore.data.collate import PromptBatch, PromptCollator
from pore.data.datamodule import BenchmarkDataModule
from pore.data.stream import BenchmarkStream, FailedSample, StreamSource

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkDataModule",
    "BenchmarkStream",
    "DataError",
    "FailedSample",
    "PromptBatch",
    "PromptCollator",
    "Sample",
    "SampleError",
    "StreamSource",
]
