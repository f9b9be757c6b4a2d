"""Benchmarks (registered by name), their evaluation protocols, streaming and batching."""

from pore.data import benchmarks as _benchmarks  # noqa: F401  (registers the built-in benchmarks)
from pore.data.benchmark import BENCHMARKS, Benchmark, DataError, Sample, SampleError
from pore.data.collate import PromptBatch, PromptCollator
from pore.data.stream import BenchmarkStream, FailedSample, StreamSource

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkStream",
    "DataError",
    "FailedSample",
    "PromptBatch",
    "PromptCollator",
    "Sample",
    "SampleError",
    "StreamSource",
]
