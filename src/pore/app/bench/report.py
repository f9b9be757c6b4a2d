"""From measurements to answers: ratios side by side, the issue's targets, the table, the JSON file.

Definitions (medians over repeats; "unpruned" and "ideal" are from the same batch and backend):

- speed-up = unpruned prefill / pruned prefill; ideal speed-up = unpruned / ideal;
- achieved / ideal = speed-up / ideal speed-up = ideal prefill / pruned prefill;
- LM speed-up: the same without the vision tower's time, which pruning cannot change;
- overhead = the pruner's hook chains (layout, scoring from the captured row, prior, top-k, gather, masks)
  + its extra time inside layer K-1's attention (the last-query row): that attention's time in the pruned
  run minus in the ideal run, paired by instrumented round and taken as the median (negative values, i.e.
  noise, count as 0); as a share of the pruned prefill. `pruned - ideal` (medians) is reported too: it also
  holds what the brackets cannot see (the launch queue drained by a host sync);
- generation speed-up = unpruned generate time / pruned generate time (same tokens);
- memory ratio = pruned peak / unpruned peak (device allocator high-water mark; GPU only);
- eager FastV: its prefill, its speed-up over the same unpruned reference, and ours vs it = eager FastV
  prefill / ours (> 1: ours is faster).

A ratio smaller than the spread of its timings is noise: the report warns (`pore.app.bench.noise`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

from pore.app.bench.noise import spread_warning
from pore.app.bench.settings import Targets
from pore.assets import REPOSITORY

SCHEMA = "pore.bench/1"
Key = tuple[int, str, str, int, str | None]


def _median(record: dict[str, Any] | None, key: str) -> float | None:
    value = (record or {}).get(key)
    return None if value is None else value.get("median")


def _span(record: dict[str, Any] | None, label: str) -> float | None:
    return ((record or {}).get("spans_ms") or {}).get(label)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 4)


def _peak(record: dict[str, Any] | None, phase: str) -> float | None:
    memory = ((record or {}).get("peak_memory_mb") or {}).get(phase)
    return None if memory is None else memory["peak"]


def _paired_difference(record: dict[str, Any], ideal: dict[str, Any] | None, label: str) -> float | None:
    """Median over instrumented rounds of (this record's span - the ideal's span of the same round): the
    two were measured back to back in each round, so a slow spell of the machine cancels out."""
    ours = record.get("scoring_attention_samples_ms") or []
    theirs = (ideal or {}).get("scoring_attention_samples_ms") or []
    if ours and len(ours) == len(theirs):
        return round(statistics.median(a - b for a, b in zip(ours, theirs, strict=True)), 4)
    if _span(record, label) is None or _span(ideal, label) is None:
        return None
    return round(_span(record, label) - _span(ideal, label), 4)


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pruned setting (batch x backend x budget x strategy) with every ratio of the issue."""
    ok: dict[Key, dict[str, Any]] = {
        (r["batch"], r["implementation"], r["approach"], r["budget"], r["strategy"]): r
        for r in results
        if r["status"] == "ok"
    }

    def find(batch: int, implementation: str, approach: str, budget: int | None = None) -> dict | None:
        for (b, i, a, k, _), record in ok.items():
            if b == batch and i == implementation and a == approach and (budget is None or k == budget):
                return record
        return None

    rows = []
    for record in results:
        if record["approach"] != "pruned":
            continue
        batch, implementation, budget = record["batch"], record["implementation"], record["budget"]
        row: dict[str, Any] = {
            "batch": batch,
            "implementation": implementation,
            "strategy": record["strategy"],
            "budget": budget,
            "status": record["status"],
        }
        if record["status"] != "ok":
            rows.append(row)
            continue
        unpruned = find(batch, implementation, "unpruned")
        ideal = find(batch, implementation, "ideal", budget)
        eager = find(batch, "eager", "fastv_eager", budget)
        row.update(_ratios(record, unpruned, ideal, eager, find(batch, "eager", "unpruned")))
        rows.append(row)
    return rows


def _ratios(
    record: dict[str, Any],
    unpruned: dict | None,
    ideal: dict | None,
    eager: dict | None,
    eager_base: dict | None,
) -> dict[str, Any]:
    """A pruned setting's times and ratios against the unpruned model, the ideal reduction and eager FastV
    of the same batch and backend (None where one of them is missing)."""
    from pore.app.bench.entry import SCORING_ATTENTION, VISION

    pruned_ms, unpruned_ms, ideal_ms = (_median(r, "prefill_ms") for r in (record, unpruned, ideal))
    vision = _span(unpruned, VISION)
    lm = (
        (unpruned_ms - vision, pruned_ms - vision)
        if None not in (unpruned_ms, vision, pruned_ms)
        else (None, None)
    )
    hooks = _median(record, "hooks_ms")
    scoring_attention = _paired_difference(record, ideal, SCORING_ATTENTION)
    overhead = None if hooks is None else hooks + max(scoring_attention or 0.0, 0.0)
    eager_ms = _median(eager, "prefill_ms")
    return {
        "prefill_ms": pruned_ms,
        "unpruned_ms": unpruned_ms,
        "ideal_ms": ideal_ms,
        "vision_ms": vision,
        "speedup": _ratio(unpruned_ms, pruned_ms),
        "ideal_speedup": _ratio(unpruned_ms, ideal_ms),
        "achieved_over_ideal": _ratio(ideal_ms, pruned_ms),
        "lm_speedup": _ratio(*lm),
        "hooks_ms": hooks,
        "scoring_attention_ms": scoring_attention,
        "ideal_hooks_ms": _median(ideal, "hooks_ms"),
        "overhead_ms": None if overhead is None else round(overhead, 4),
        "overhead_pct": None if overhead is None else round(100 * overhead / pruned_ms, 3),
        "pruned_minus_ideal_ms": None if ideal_ms is None else round(pruned_ms - ideal_ms, 4),
        "tokens_per_s": record.get("tokens_per_s"),
        "unpruned_tokens_per_s": (unpruned or {}).get("tokens_per_s"),
        "generate_speedup": _ratio(_median(unpruned, "generate_ms"), _median(record, "generate_ms")),
        "memory_ratio_prefill": _ratio(_peak(record, "prefill"), _peak(unpruned, "prefill")),
        "memory_ratio_generate": _ratio(_peak(record, "generate"), _peak(unpruned, "generate")),
        "peak_memory_mb": _peak(record, "prefill"),
        "eager_fastv_ms": eager_ms,
        "eager_fastv_speedup": _ratio(unpruned_ms, eager_ms),
        "eager_fastv_speedup_vs_eager": _ratio(_median(eager_base, "prefill_ms"), eager_ms),
        "ours_vs_eager_fastv": _ratio(eager_ms, pruned_ms),
    }


def check_targets(
    rows: list[dict[str, Any]], targets: Targets, applicable: bool, note: str
) -> dict[str, Any] | None:
    """PASS / FAIL per target of the issue for the target setting (None if it was not measured)."""
    chosen = [
        r
        for r in rows
        if r["batch"] == targets.batch
        and r["budget"] == targets.budget
        and r["implementation"] == targets.implementation
    ]
    if not chosen:
        return None
    checks = []
    for row in chosen:

        def check(name: str, value: float | None, op: str, bound: float, row: dict = row) -> None:
            passed = (
                {">=": value >= bound, "<=": value <= bound, ">": value > bound}[op]
                if value is not None
                else None
            )
            verdict = "n/a" if value is None else "PASS" if passed else "FAIL"
            checks.append(
                {
                    "strategy": row["strategy"],
                    "target": name,
                    "value": value,
                    "op": op,
                    "bound": bound,
                    "verdict": verdict,
                }
            )

        if row["status"] != "ok":
            checks.append(
                {
                    "strategy": row["strategy"],
                    "target": "measured",
                    "value": None,
                    "op": "",
                    "bound": None,
                    "verdict": f"FAIL ({row['status']})",
                }
            )
            continue
        check("prefill speed-up over unpruned", row["speedup"], ">=", targets.min_speedup)
        check("achieved / ideal speed-up", row["achieved_over_ideal"], ">=", targets.min_achieved_over_ideal)
        check("scoring overhead, % of prefill", row["overhead_pct"], "<=", targets.max_overhead_pct)
        check("peak memory / unpruned (prefill)", row["memory_ratio_prefill"], "<=", 1.0)
        check("peak memory / unpruned (generate)", row["memory_ratio_generate"], "<=", 1.0)
        check("eager FastV prefill / ours", row["ours_vs_eager_fastv"], ">", 1.0)
    return {"setting": vars(targets), "applicable": applicable, "note": note, "checks": checks}


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": properties.name,
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    try:
        root = REPOSITORY
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        info["git"] = {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


# ---------------------------------------------------------------------------------------------- tables


def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_table(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Unpruned references and every pruned setting with its ratios, grouped by batch and backend."""
    header = (
        "| batch | backend | approach | keep | prefill ms [p10, p90] | speed-up | ideal | achieved / ideal "
        "| overhead % | gen tok/s | gen speed-up | peak GiB | eager FastV ms | eager FastV speed-up "
        "| eager FastV / ours |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    by_key = {(r["batch"], r["implementation"], r["budget"], r["strategy"]): r for r in rows}
    for record in results:
        approach = record["approach"]
        if approach not in ("unpruned", "pruned"):
            continue
        batch, implementation, budget = record["batch"], record["implementation"], record["budget"]
        name = approach if record["strategy"] is None else record["strategy"]
        if record["status"] != "ok":
            lines.append(
                f"| {batch} | {implementation} | {name} | {budget} | {record['status']} |" + " |" * 10
            )
            continue
        prefill = record["prefill_ms"]
        cell = f"{prefill['median']:.1f} [{prefill['p10']:.1f}, {prefill['p90']:.1f}]"
        peak = _peak(record, "prefill")
        peak_text = "-" if peak is None else f"{peak / 1024:.2f}"
        if approach == "unpruned":
            lines.append(
                f"| {batch} | {implementation} | unpruned | {budget} | {cell} | 1.00 | | | "
                f"| {_f(record.get('tokens_per_s'), 1)} | 1.00 | {peak_text} | | | |"
            )
            continue
        row = by_key[(batch, implementation, budget, record["strategy"])]
        lines.append(
            f"| {batch} | {implementation} | {name} | {budget} | {cell} | {_f(row['speedup'])}x "
            f"| {_f(row['ideal_speedup'])}x | {_f(row['achieved_over_ideal'])} | {_f(row['overhead_pct'])} "
            f"| {_f(row['tokens_per_s'], 1)} | {_f(row['generate_speedup'])}x | {peak_text} "
            f"| {_f(row['eager_fastv_ms'], 1)} | {_f(row['eager_fastv_speedup'])}x "
            f"| {_f(row['ours_vs_eager_fastv'])} |"
        )
    return "\n".join(lines)


def targets_text(targets: dict[str, Any] | None) -> str:
    if targets is None:
        return "targets: the target setting (batch / keep / backend) was not measured in this run"
    lines = [
        f"targets (batch {targets['setting']['batch']}, keep {targets['setting']['budget']}, "
        f"{targets['setting']['implementation']}){'' if targets['applicable'] else ' - ' + targets['note']}:"
    ]
    for check in targets["checks"]:
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        bound = "" if check["bound"] is None else f"{check['op']} {check['bound']}"
        lines.append(
            f"  {check['verdict']:<5} {check['strategy']:<12} {check['target']:<36} {value:>8} {bound}"
        )
    return "\n".join(lines)


def build_report(summary: dict[str, Any], device: torch.device, targets: Targets) -> dict[str, Any]:
    rows = comparisons(summary["results"])
    env = environment(device)
    gpu = (env.get("gpu") or {}).get("name", "")
    is_target_run = (
        "H100" in gpu and summary["model"]["name"] == "llava15_7b" and summary["settings"]["layer"] == 2
    )
    note = "informational: the targets are defined for an H100 and the LLaVA-1.5-7B architecture with K = 2"
    warning = spread_warning(summary["results"], rows)
    return {
        "schema": SCHEMA,
        "environment": env,
        **summary,
        "comparisons": rows,
        "targets": check_targets(rows, targets, is_target_run, note),
        "warnings": [] if warning is None else [warning],
    }


def write_report(report: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """The JSON report and, beside it, the Markdown table (+ targets) for the README."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    table = path.with_suffix(".md")
    table.write_text(render(report) + "\n")
    return path, table


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def render(report: dict[str, Any], warnings: bool = True) -> str:
    """The report as text: title, table, vision tower, targets and (`warnings`) the noise warning."""
    env, model = report["environment"], report["model"]
    where = (env.get("gpu") or {}).get("name") or f"CPU ({env['processor']}, {env['torch_threads']} threads)"
    title = (
        f"{model['name']} ({_count(model['parameters'])} parameters), {report['dtype']}, on {where}; "
        f"K = {report['settings']['layer']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"clock: {report.get('clock', '?')}"
    )
    skipped = "".join(f"\nskipped {s['implementation']}: {s['reason']}" for s in report["skipped"])
    from pore.app.bench.entry import VISION

    vision = [
        f"batch {r['batch']}: {r['spans_ms'][VISION]:.1f} ms"
        for r in report["results"]
        if r["approach"] == "unpruned"
        and r["implementation"] != "eager"
        and r["status"] == "ok"
        and VISION in (r.get("spans_ms") or {})
    ]
    parts = [title + skipped, markdown_table(report["results"], report["comparisons"])]
    if vision:
        parts.append(
            "vision tower (the same in every setting; pruning cannot shorten it): " + ", ".join(vision)
        )
    parts.append(targets_text(report["targets"]))
    if warnings:
        parts += [f"warning: {warning}" for warning in report.get("warnings", [])]
    return "\n\n".join(parts)
