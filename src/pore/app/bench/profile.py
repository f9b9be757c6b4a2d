"""torch.profiler traces of one setting's prefill, with the pruner's hooks shown as named ranges.

Enabled with `bench.profile=true`: for the largest batch and smallest budget, the pruned (first strategy),
ideal and eager-FastV prefills are profiled. Each gives a gzipped Chrome trace (open in chrome://tracing or
Perfetto) in `<report>-profiles/`, and a table of the operators by device (or CPU) time in the JSON report
(`profiles`). When a target is missed, this is where to see where the time goes: scoring kernels, host
synchronisations (gaps on the device timeline while `aten::item` / `aten::nonzero` wait), mask
construction, the attention kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity

from pore.app.bench.probes import Probe
from pore.app.bench.timing import clock_for

PROFILED_STEPS = 2


def profile_dir(output: str | None) -> Path:
    base = Path(output) if output else Path("outputs/bench/report.json")
    return base.with_suffix("").parent / f"{base.stem}-profiles"


def profile_prefill(
    prefill: Callable[[], Any],
    added: list[tuple[str, nn.Module, bool, bool]],
    device: torch.device,
    settings: Any,
    stem: str,
) -> dict[str, Any]:
    """Profile `PROFILED_STEPS` prefills; returns the trace's path and the table of the top operators."""
    probe = Probe(clock_for(device, settings.cpu_clock), annotate=True)
    for name, module, pre, post in added:
        probe.around_hooks(module, f"pore:{name}", pre, post)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    folder = profile_dir(settings.output)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(PROFILED_STEPS):
                prefill()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    finally:
        probe.remove()
    trace = folder / f"{stem}.trace.json.gz"  # gzipped: a 7B prefill trace is tens of MB
    profiler.export_chrome_trace(str(trace))
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=40)
    # The table goes into the JSON report (one file fewer to fetch back from a GPU machine).
    return {"trace": str(trace), "steps": PROFILED_STEPS, "sorted_by": sort_by, "table": table}


def is_profile_target(settings: Any, setting: Any) -> bool:
    """Whether `bench.profile=true` profiles this setting: the largest batch, the smallest pruned budget, the
    first strategy (or FastV) of each pruning approach."""
    pruned = [b for b in settings.budgets if b < max(settings.budgets)]
    return (
        setting.batch == max(settings.batch_sizes)
        and bool(pruned)
        and setting.budget == min(pruned)
        and setting.approach in ("pruned", "ideal", "fastv_eager")
        and setting.strategy in (None, settings.strategies[0], "fastv")
    )


def profile_setting(
    setting: Any,
    prefill: Callable[[], Any],
    added: list[tuple[str, nn.Module, bool, bool]],
    device: torch.device,
    settings: Any,
) -> dict[str, Any]:
    """The profile of one setting's prefill, labelled with the setting (`Setting` of the bench runner)."""
    stem = f"{setting.approach}-{setting.strategy or 'none'}-{setting.implementation}-b{setting.batch}"
    stem += f"-k{setting.budget}"
    return {"setting": asdict(setting), **profile_prefill(prefill, added, device, settings, stem)}
