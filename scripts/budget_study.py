"""Accuracy against budget for every strategy, through the real pipeline, as a markdown table.

    python scripts/budget_study.py                       # embedded model, spatial benchmark, CPU
    python scripts/budget_study.py model=llava15_7b data=gqa data.limit=1000 --budgets 576 192 128 64

Each cell is one `pore.app.evaluate` run (the code path of `python src/run.py`) with `logger=none` in its own
output folder under `outputs/budget_study/`, so reruns resume and finished cells cost nothing. Extra
arguments are Hydra overrides applied to every run. Budgets are image tokens kept per image; "all" means
every token (the unpruned model is run once, with strategy=none).

A strategy may name a calibrated prior's form after a slash (`pore_calibrated/profile2d`) and its pruning
layer after an at sign (`fastervlm@2`: FasterVLM pruning before layer 2, like FastV, instead of before the
language model). Settings of one strategy go in brackets, separated by semicolons:
`pdrop[strategy.options.score_from=previous_layer;strategy.positions=original]` runs PyramidDrop as this
project did before it followed the official code, next to `pdrop`; `{b}` in a setting stands for the budget.

Multi-stage strategies (PyramidDrop's and SparseVLM's presets: their names contain `pdrop` or `sparsevlm`) get
three stages before layers 1, 2 and 3 (the embedded model has 4) keeping 4b, 2b and b tokens (capped at the
image's tokens), so their last stage meets the budget b; `--stage-layers` changes the layers.

Every accuracy comes with its 95 % bootstrap interval over the questions (`bootstrap.*` overrides change the
resamples, seed and level). A second table pairs each strategy with a prior (PoRe) against the same method
without a prior at the same layer and budget (pore_linear against fastv, pore_pdrop_linear against pdrop,
`X@1` against `fastv@1`): the paired difference with its interval, McNemar's exact test and whether the
difference is distinguishable from zero (docs/statistics.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from pore.app.comparison.paired import compare_pair, verdict
from pore.app.comparison.runs import load_result
from pore.app.evaluate import evaluate
from pore.app.identity import register_resolvers
from pore.stats.bootstrap import BootstrapSettings

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = (
    "random",
    "random@0",
    "pool",
    "pool@2",
    "pool_average",
    "fastervlm",
    "fastervlm@2",
    "fastv",
    "pore_linear",
    "pore_exponential",
    "sparsevlm",
    "pore_sparsevlm_linear",
    "pdrop",
    "pore_pdrop_linear",
    "pore_calibrated/linear",
    # K = 1: ranked by layer 0, where the embedded model's attention is most biased towards the bottom.
    "fastv@1",
    "pore_linear@1",
    "pore_exponential@1",
    "pore_calibrated/linear@1",
    "pore_calibrated/profile@1",
)


def run(overrides: list[str]) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return evaluate(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 16, 8], help="tokens kept per image")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "budget_study")
    parser.add_argument("--json", type=Path, help="also write every cell's metrics here")
    parser.add_argument("--stage-layers", type=int, nargs="+", default=[1, 2, 3])
    args, overrides = parser.parse_known_args()
    register_resolvers()

    base = ["logger=none", *overrides]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    folders: dict[tuple[str, str], Path] = {("none", "all"): args.out / "none"}
    cells[("none", "all")] = run([*base, "strategy=none", f"output_dir={args.out}/none"])
    metrics = cells[("none", "all")]
    before = int(metrics["eff/visual_tokens_before"])
    for strategy in args.strategies:
        name, _, extra = strategy.partition("[")
        extra_settings = [setting for setting in extra.rstrip("]").split(";") if setting]
        name, _, layer = name.partition("@")
        name, _, form = name.partition("/")
        for budget in args.budgets:
            settings = [f"strategy={name}", f"strategy.keep={budget}"]
            if form:
                settings.append(f"strategy.prior.form={form}")
            if layer:
                settings.append(f"strategy.layer={layer}")
            if "pdrop" in name or "sparsevlm" in name:
                stages = len(args.stage_layers)
                keeps = [min(before, budget * 2 ** (stages - 1 - i)) for i in range(stages)]
                layers = ",".join(map(str, args.stage_layers))
                settings = [f"strategy={name}", f"strategy.layer=[{layers}]", "strategy.ratio=null"]
                settings.append("++strategy.reference_depth=null")  # this model's layers: not to be scaled
                settings.append(f"strategy.keep=[{','.join(map(str, keeps))}]")
            settings += [setting.replace("{b}", str(budget)) for setting in extra_settings]
            slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in strategy.replace("@", "-K"))
            folder = f"{args.out}/{slug}-keep{budget}"
            cells[(strategy, str(budget))] = run([*base, *settings, f"output_dir={folder}"])
            folders[(strategy, str(budget))] = Path(folder)

    prefix = next(key.split("/")[0] for key in metrics if key.endswith("/acc"))
    table = accuracy_table(cells, prefix, before)
    print(table)
    paired = paired_tests(folders, args.budgets, bootstrap_settings(overrides))
    print("\n" + paired_table(paired, prefix))
    if args.json:
        cells_json = {f"{s}/{b}": v for (s, b), v in cells.items()}
        args.json.write_text(json.dumps({"cells": cells_json, "paired": paired}, indent=2) + "\n")


def _percent_interval(values: dict[str, float], key: str) -> str:
    """`84.5 [80.9, 87.9]` (in %), or the value alone for a run without intervals."""
    text = f"{100 * values[key]:.1f}"
    if f"{key}/ci_low" in values:
        text += f" [{100 * values[f'{key}/ci_low']:.1f}, {100 * values[f'{key}/ci_high']:.1f}]"
    return text


def accuracy_table(cells: dict[tuple[str, str], dict[str, float]], prefix: str, before: int) -> str:
    """The study's table: accuracy (with its 95 % interval) and the region accuracies per cell."""
    metrics = cells[("none", "all")]
    region_keys = [k for k in (f"{prefix}/acc_top", f"{prefix}/acc_bottom") if k in metrics]
    header = ["strategy", "kept / image", f"{prefix} acc [95 % CI]"]
    header += [k.split("/")[1] for k in region_keys] + ["prefill TFLOPs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (strategy, budget), values in cells.items():
        kept = f"{before} (all)" if budget == "all" else f"{budget} ({100 * int(budget) / before:.1f} %)"
        row = [strategy, kept, _percent_interval(values, f"{prefix}/acc")]
        row += [f"{100 * values[key]:.1f}" for key in region_keys]
        row.append(f"{values['eff/prefill_tflops']:.2e}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def bootstrap_settings(overrides: list[str]) -> BootstrapSettings:
    """The bootstrap settings of the runs (`bootstrap.resamples=...` etc. among the overrides)."""
    given = dict(item.split("=", 1) for item in overrides if item.startswith("bootstrap."))
    default = BootstrapSettings()
    return BootstrapSettings(
        int(given.get("bootstrap.resamples", default.resamples)),
        int(given.get("bootstrap.seed", default.seed)),
        float(given.get("bootstrap.level", default.level)),
    )


def baseline_of(strategy: str, ran: dict[str, dict], strategies: list[str]) -> str | None:
    """The strategy of the study that runs the same method at the same layer without a prior (plain
    settings preferred), for a strategy with a prior; None otherwise."""
    mine = ran[strategy]
    if mine["prior"]["name"] == "none":
        return None
    layer = strategy.partition("[")[0].partition("@")[2]
    candidates = [
        other
        for other in strategies
        if other != strategy
        and ran[other]["method"] == mine["method"]
        and ran[other]["prior"]["name"] == "none"
        and other.partition("[")[0].partition("@")[2] == layer
    ]
    candidates.sort(key=lambda other: "[" in other)  # a plain preset before one with settings
    return candidates[0] if candidates else None


def paired_tests(
    folders: dict[tuple[str, str], Path], budgets: list[int], settings: BootstrapSettings
) -> list[dict]:
    """Each strategy with a prior against its baseline at every budget: accuracy difference, interval,
    McNemar's exact test, verdict."""
    strategies = list(dict.fromkeys(strategy for strategy, budget in folders if budget != "all"))
    first_budget = str(budgets[0])
    ran = {s: json.loads((folders[(s, first_budget)] / "strategy.json").read_text()) for s in strategies}
    results = []
    for strategy in strategies:
        baseline = baseline_of(strategy, ran, strategies)
        if baseline is None:
            continue
        for budget in map(str, budgets):
            pair = compare_pair(
                load_result(folders[(baseline, budget)]), load_result(folders[(strategy, budget)]), settings
            )
            diff = pair.differences["acc"]
            test = diff.mcnemar
            results.append(
                {
                    "budget": int(budget),
                    "strategy": strategy,
                    "baseline": baseline,
                    "baseline_acc": diff.first,
                    "acc": diff.second,
                    "difference": diff.difference.estimate,
                    "ci_low": diff.difference.low,
                    "ci_high": diff.difference.high,
                    "mcnemar_p": None if test is None else test.p_value,
                    "only_baseline": None if test is None else test.only_first,
                    "only_strategy": None if test is None else test.only_second,
                    "verdict": verdict(diff, settings.level, (baseline, strategy)),
                    "answer_agreement": pair.agreement.estimate,
                    "kept_overlap": None if pair.overlap is None else pair.overlap.estimate,
                }
            )
    return results


def paired_table(results: list[dict], prefix: str) -> str:
    header = [
        "kept / image",
        "strategy",
        "vs",
        f"{prefix} acc difference [95 % CI]",
        "McNemar p (only vs / only strategy)",
    ]
    header += ["verdict", "same answer", "kept overlap (Jaccard)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(results, key=lambda r: (-r["budget"], r["strategy"])):
        difference = f"{100 * r['difference']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
        test = (
            "-"
            if r["mcnemar_p"] is None
            else f"{r['mcnemar_p']:.2f} ({r['only_baseline']} / {r['only_strategy']})"
        )
        overlap = "-" if r["kept_overlap"] is None else f"{r['kept_overlap']:.2f}"
        cells = [str(r["budget"]), r["strategy"], r["baseline"], difference, test, r["verdict"]]
        lines.append("| " + " | ".join([*cells, f"{100 * r['answer_agreement']:.1f} %", overlap]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
