"""Clocks, repeated measurements, summaries and peak memory, the same way on a GPU and a CPU.

On CUDA, work is asynchronous: each measurement synchronises the device, records a CUDA event before and
after the call on the current stream, synchronises again and reads the events' elapsed time, so the number
is device time from the first kernel of the call to the last (host work that delays launches included,
host work that overlaps with kernels not). On a CPU every call is synchronous. Two host clocks:

- `wall`: `time.perf_counter`, wall-clock time;
- `process`: `time.process_time`, the CPU time this process used. On a machine shared with other jobs a
  descheduled process accrues no CPU time, so this clock does not count the time other processes took the
  core; with one torch thread it equals the wall-clock time the call takes on an idle core. (With several
  threads it adds their times up, so `auto` picks it only when torch runs one thread.)

Warm-up calls come first (kernel selection, caching allocator growth, lazy initialisation), then `repeats`
measured calls; summaries give the median and the spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class Clock:
    """perf_counter on the host; `CudaClock` uses CUDA events. Marks are opaque; `elapsed_ms` after `sync`."""

    name = "wall"

    def sync(self) -> None:
        pass

    def mark(self) -> Any:
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return (end - start) * 1e3


class ProcessClock(Clock):
    """CPU time of this process (all its threads): immune to other processes taking the core."""

    name = "process"

    def mark(self) -> float:
        return time.process_time()


class CudaClock(Clock):
    name = "cuda_events"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return float(start.elapsed_time(end))


CPU_CLOCKS = ("auto", "wall", "process")


def clock_for(device: torch.device, cpu_clock: str = "auto") -> Clock:
    """CUDA events on a GPU; on a CPU the `cpu_clock` (auto = process with one torch thread, else wall)."""
    if device.type == "cuda":
        return CudaClock(device)
    if cpu_clock not in CPU_CLOCKS:
        raise ValueError(f"bench.cpu_clock must be one of {CPU_CLOCKS}, got {cpu_clock!r}")
    if cpu_clock == "auto":
        cpu_clock = "process" if torch.get_num_threads() == 1 else "wall"
    return ProcessClock() if cpu_clock == "process" else Clock()


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated measurements (milliseconds unless said otherwise)."""

    median: float
    p10: float
    p90: float
    min: float
    max: float
    mean: float
    std: float
    n: int
    samples: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            raise ValueError("no measurements to summarise")
        ordered = sorted(values)
        return cls(
            median=statistics.median(ordered),
            p10=_percentile(ordered, 0.1),
            p90=_percentile(ordered, 0.9),
            min=ordered[0],
            max=ordered[-1],
            mean=statistics.fmean(ordered),
            std=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            n=len(ordered),
            samples=tuple(values),
        )

    def as_dict(self) -> dict[str, Any]:
        def r(x: float) -> float:
            return round(x, 4)

        return {
            "median": r(self.median),
            "p10": r(self.p10),
            "p90": r(self.p90),
            "min": r(self.min),
            "max": r(self.max),
            "mean": r(self.mean),
            "std": r(self.std),
            "n": self.n,
            "samples": [r(x) for x in self.samples],
        }


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> dict[str, float] | None:
    """Peak device memory of one call of `fn`: the allocator's high-water mark, and its rise over what was
    allocated before the call (weights and inputs). None on a CPU, where no per-call peak is available
    without a sampling profiler (ru_maxrss only ever grows over the process's life)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak": round(peak / 2**20, 1), "above_resident": round((peak - before) / 2**20, 1)}


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out-of-memory, or a CPU allocator failure: the setting is recorded as "oom" and skipped."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
