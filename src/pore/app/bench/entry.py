"""One setting of the bench sweep (`Setting`), its measurements while the sweep runs (`Entry`), and the result
row it becomes (`entry_record`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from torch import nn

from pore.app.bench.timing import Summary
from pore.app.bench.workload import Workload

# Labels of the whole-module brackets; every other span is a hook chain the attached object added.
VISION = "vision_tower"
SCORING_ATTENTION = "attention_layer_k-1"


@dataclass(frozen=True)
class Setting:
    batch: int
    implementation: str  # attention backend of the language model
    approach: str  # unpruned | pruned | ideal | fastv_eager
    budget: int  # image tokens kept per image from layer K on (all of them for unpruned)
    strategy: str | None = None

    def label(self) -> str:
        name = self.approach if self.strategy is None else f"{self.approach}:{self.strategy}"
        return f"batch={self.batch} {self.implementation} {name} keep={self.budget}"


class Attachable(Protocol):
    """What the approaches share: attach() / detach() (a Pruner, a SequenceReducer)."""

    def attach(self) -> Any: ...

    def detach(self) -> None: ...


@dataclass(eq=False)
class Entry:
    """One setting during a batch's sweep: how to set the model up, and what was measured so far."""

    setting: Setting
    attention: str | dict[str, str]  # for model.set_attn_implementation
    factory: Callable[[], Attachable] | None  # None = the model as is
    status: str = "ok"  # of the prefill measurements (ok | oom | error); not ok = nothing more is measured
    generate_status: str = "ok"  # of the generation measurements
    error: str | None = None
    times: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    probe_runs: list[dict[str, float]] = field(default_factory=list)  # one {label: ms} per instrumented run
    hook_labels: set[str] = field(default_factory=set)  # the probe labels that are the attached hooks
    attached: Attachable | None = None
    added: list[tuple[str, nn.Module, bool, bool]] = field(default_factory=list)


def probe_summary(entry: Entry) -> dict[str, Any]:
    """Medians of the instrumented prefills' spans, the attached hooks' total, and layer K-1's attention per
    round."""
    runs = entry.probe_runs
    if not runs:
        return {}
    labels = sorted({label for run in runs for label in run})
    # Medians per label (a label missing from a run counts as 0: e.g. a hook that returned early).
    spans = {label: round(Summary.of([run.get(label, 0.0) for run in runs]).median, 4) for label in labels}
    hooks = Summary.of([sum(v for k, v in run.items() if k in entry.hook_labels) for run in runs])
    return {
        "spans_ms": spans,
        "hooks_ms": hooks.as_dict() if entry.hook_labels else None,
        # Per round, for paired differences against the ideal of the same round (see report.py).
        "scoring_attention_samples_ms": [round(run.get(SCORING_ATTENTION, 0.0), 4) for run in runs],
    }


def entry_record(entry: Entry, workload: Workload, new_tokens: int) -> dict[str, Any]:
    """The result row of one setting: what it is, its status, and its summarised measurements."""
    setting = entry.setting
    record: dict[str, Any] = {**asdict(setting), "status": entry.status}
    record["tokens_from_layer_k"] = workload.length - workload.image_tokens + setting.budget
    if entry.status != "ok":
        if entry.error:
            record["error"] = entry.error
        return record
    record["prefill_ms"] = Summary.of(entry.times["prefill_ms"]).as_dict()
    record.update(probe_summary(entry))
    record.update(entry.details)
    if entry.generate_status != "ok":
        record["generate_status"] = entry.generate_status
        if entry.error:
            record["error"] = entry.error
    elif entry.times.get("generate_ms"):
        summary = Summary.of(entry.times["generate_ms"])
        record["generate_ms"] = summary.as_dict()
        record["tokens_per_s"] = round(workload.batch * new_tokens / (summary.median / 1e3), 2)
        decode_ms = summary.median - record["prefill_ms"]["median"]
        decode_tokens = workload.batch * (new_tokens - 1)
        record["decode_tokens_per_s"] = (
            round(decode_tokens / (decode_ms / 1e3), 2) if decode_ms > 0 and decode_tokens else None
        )
    return record
