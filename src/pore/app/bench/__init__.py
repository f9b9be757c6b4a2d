"""Wall-clock benchmark of visual-token pruning: `python src/bench.py` (conf/bench.yaml).

Modules, one idea each: `architecture` (the model from its shapes, random weights), `workload` (LLaVA-shaped
synthetic prompts), `timing` (CUDA events / perf_counter, summaries, peak memory), `reduce` (the ideal:
pruning at layer K with a fixed index and no scoring), `fastv_eager` (the official FastV approach), `probes`
(costs of a pruner's hooks), `profile` (torch.profiler traces), `runner` (the sweep), `report` (ratios,
targets, JSON and Markdown), `main` (config -> report).
"""

from pore.app.bench.architecture import Architecture, build_model, count_parameters, resolve_architecture
from pore.app.bench.fastv_eager import EagerFastV
from pore.app.bench.reduce import IdealReducer, SequenceReducer
from pore.app.bench.report import build_report, render, write_report
from pore.app.bench.runner import Runner
from pore.app.bench.settings import BenchSettings, Targets
from pore.app.bench.workload import Workload, make_workload

__all__ = [
    "Architecture",
    "BenchSettings",
    "EagerFastV",
    "IdealReducer",
    "Runner",
    "SequenceReducer",
    "Targets",
    "Workload",
    "build_model",
    "build_report",
    "count_parameters",
    "make_workload",
    "render",
    "resolve_architecture",
    "write_report",
]
