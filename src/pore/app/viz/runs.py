"""Read evaluation runs (predictions.jsonl + config.yaml) into what the pictures need.

The images are not in the predictions: they are read again from the run's benchmark data by question id,
with the evaluation's own data code (the run's resolved `config.yaml` names the data), and shown as the
model's processor prepared them, so the token grid lies exactly on the picture.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pore.app.evaluation import predictions as prediction_files
from pore.app.evaluation.predictions import STRATEGY_FILE
from pore.app.viz.figures import KeptSummary, SampleView
from pore.errors import UserError

log = logging.getLogger("pore")


@dataclass
class Run:
    """One evaluation run: its folder, config and prediction rows."""

    path: Path | None
    config: DictConfig
    rows: list[dict[str, Any]]
    label: str
    grid: tuple[int, int]

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {row["question_id"]: row for row in self.rows}


def run_label(config: DictConfig, ran: Mapping[str, Any] | None = None) -> str:
    """e.g. `pore_calibrated (profile2d), keep 16, K=2`: the layers are those the run pruned before (`ran`,
    the resolved strategy of its strategy.json: a preset's layers scaled to the model), else the config's."""
    strategy = config.strategy
    if ran is not None:
        strategy = OmegaConf.merge(
            strategy, {key: ran[key] for key in ("layer", "keep", "ratio") if key in ran}
        )
    label = str(strategy.name)
    prior = strategy.get("prior") or {}
    if prior.get("name") == "calibrated":
        label += f" ({prior.get('form', 'profile')})"
    if strategy.get("method", "none") == "none":
        return label
    budget = f"keep {strategy.keep}" if strategy.get("keep") is not None else f"ratio {strategy.get('ratio')}"
    layer = strategy.get("layer")
    layer = ",".join(str(v) for v in layer) if OmegaConf.is_list(layer) or isinstance(layer, list) else layer
    return f"{label}, {budget}, K={layer}"


def _images_of(row: dict[str, Any]) -> list[list[int]]:
    kept = row.get("kept_visual_indices")
    if kept is None:
        return []
    if kept and isinstance(kept[0], list):
        return kept
    return [kept]


def model_grid(config: DictConfig, rows: Sequence[dict[str, Any]] = ()) -> tuple[int, int]:
    """The model's image-token grid (H, W): from its config for LLaVA-1.5 (image_size / patch_size), else
    inferred as the square root of the visual tokens per image of the run (one square grid per image only:
    LLaVA-NeXT's several grids or Qwen2-VL's per-image grids are not drawn)."""
    try:
        from transformers import AutoConfig

        from pore.adapters import adapter_class_for_config

        model_config = AutoConfig.from_pretrained(str(config.model.path))
        tokens = adapter_class_for_config(model_config, config.model.get("adapter")).fixed_image_tokens(
            model_config
        )
        side = math.isqrt(tokens or 0)
        if tokens and side * side == tokens:  # one fixed square grid per image (LLaVA-1.5)
            return side, side
    except Exception as error:  # offline hub id, or a family without that layout
        log.info("grid from the model config failed (%s); inferring it from the token counts", error)
    for row in rows:
        images = len(_images_of(row)) or 1
        before = row.get("n_visual_tokens_before")
        if before:
            side = math.isqrt(int(before) // images)
            if side * side * images == int(before):
                return side, side
    raise ValueError(
        "cannot tell the image grid of this run: the kept-token pictures need one square grid per image "
        "(LLaVA-1.5 style); LLaVA-NeXT tiles and Qwen2-VL dynamic grids are not drawn"
    )


def load_run(path: str | Path, label: str | None = None) -> Run:
    """A finished (or partial) run folder."""
    path = Path(path)
    config_path = path / "config.yaml"
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give the output_dir of an evaluation run")
    if not config_path.exists():
        raise UserError(
            f"{path} is not the output_dir of an evaluation run (it has no config.yaml; a run writes it when "
            "it starts answering); give the folder of a run"
        )
    config = OmegaConf.load(config_path)
    rows = [row for row in prediction_files.all_rows(path) if row.get("error") is None]
    if not rows:
        raise UserError(
            f"{path} has no answered question to draw (its run failed or has not answered yet: see "
            f"{path / 'run.log'}); rerun it, or give a finished run"
        )
    ran_path = path / STRATEGY_FILE
    ran = json.loads(ran_path.read_text()) if ran_path.exists() else None
    return Run(path, config, rows, label or run_label(config, ran), model_grid(config, rows))


def kept_summary(run: Run) -> KeptSummary:
    """Counts of kept tokens per grid cell over every image of the run (unpruned rows are left out)."""
    grid_h, grid_w = run.grid
    counts = np.zeros(grid_h * grid_w, dtype=np.int64)
    images = kept = 0
    for row in run.rows:
        for indices in _images_of(row):
            index = np.asarray(indices, dtype=np.int64)
            index = index[(index >= 0) & (index < grid_h * grid_w)]
            np.add.at(counts, index, 1)
            images, kept = images + 1, kept + index.size
    return KeptSummary(run.label, grid_h, grid_w, counts.reshape(grid_h, grid_w), images, kept)


def pruned_ids(runs: Sequence[Run]) -> list[str]:
    """Question ids that every run answered with a pruning record."""
    common = None
    for run in runs:
        ids = {row["question_id"] for row in run.rows if _images_of(row)}
        common = ids if common is None else common & ids
    return sorted(common or [])


def _number(question_id: str) -> int | None:
    """The number a question id ends with (`test-000017` -> 17), None without one."""
    digits = re.search(r"(\d+)$", question_id)
    return None if digits is None else int(digits.group(1))


def resolve_ids(given: Sequence[str], available: set[str]) -> list[str]:
    """The question ids the user means: an id as the predictions write it, or just its number (`17` for
    `test-000017`) when exactly one answered id ends with that number."""
    by_number: dict[int, list[str]] = {}
    for qid in available:
        number = _number(qid)
        if number is not None:
            by_number.setdefault(number, []).append(qid)
    resolved, unknown = [], []
    for qid in given:
        matches = [qid] if qid in available else by_number.get(_number(qid), []) if qid.isdigit() else []
        if len(matches) == 1:
            resolved.append(matches[0])
        else:
            unknown.append(qid)
    if unknown:
        examples = sorted(available)[:3]
        raise UserError(
            f"--ids {' '.join(unknown)}: not the id (or the number of the id) of a question every run "
            f"answered with pruning; such ids look like {', '.join(examples) or '(none: nothing was pruned)'}"
        )
    return resolved


def most_different(runs: Sequence[Run], count: int) -> list[str]:
    """The ids where the first and the last run's kept sets overlap least (Jaccard): usually the baseline
    and the method under study, for side-by-side pictures."""
    ids = pruned_ids(runs)
    if len(runs) < 2:
        return ids[:count]
    first, second = runs[0].by_id(), runs[-1].by_id()

    def overlap(qid: str) -> float:
        a, b = set(_images_of(first[qid])[0]), set(_images_of(second[qid])[0])
        return len(a & b) / max(len(a | b), 1)

    return sorted(ids, key=lambda qid: (overlap(qid), qid))[:count]


def _benchmark_samples(config: DictConfig, wanted: set[str] | None, count: int) -> list[Any]:
    """Samples (with images) from the run's data: those in `wanted`, or the first `count` of the stream."""
    from pore.app.config import build_benchmark
    from pore.data import BenchmarkStream, Sample

    benchmark, source = build_benchmark(config)
    found: list[Sample] = []
    for item in BenchmarkStream(benchmark, source):
        if not isinstance(item, Sample) or item.image is None:
            continue
        if wanted is None or item.question_id in wanted:
            found.append(item)
        if (wanted is None and len(found) >= count) or (wanted is not None and len(found) == len(wanted)):
            break
    return found


def model_view(processor: Any, image: Any) -> np.ndarray:
    """(S, S', 3) uint8: the image after the processor's resize / crop / padding (normalisation undone)."""
    if processor is not None:
        try:
            image_processor = processor.image_processor
            pixels = image_processor(images=image, return_tensors="np")["pixel_values"]
            pixels = np.asarray(pixels)
            if pixels.ndim == 4 and pixels.shape[1] == 3:  # (1, 3, S, S'): one view (LLaVA-1.5)
                mean = np.asarray(image_processor.image_mean, dtype=np.float32)[:, None, None]
                std = np.asarray(image_processor.image_std, dtype=np.float32)[:, None, None]
                pixels = pixels[0] * std + mean
                return (np.clip(pixels.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        except Exception as error:  # a processor with another layout: fall back to the raw image
            log.info(
                "could not show the processor's view (%s); showing the image stretched to a square", error
            )
    side = max(image.size)
    return np.asarray(image.convert("RGB").resize((side, side)), dtype=np.uint8)


def _correct(benchmark_metric: Any, row: dict[str, Any]) -> bool | None:
    """Whether the prediction is right by the benchmark's own metric (None when that cannot be told)."""
    if benchmark_metric is None:
        return None
    try:
        metric = benchmark_metric(sync_on_compute=False)
        metric.update([row["prediction"]], [row["answers"]], **_extras(row))
        values = metric.compute()
        return bool(float(next(iter(values.values()))) > 0.5)
    except Exception:  # metrics that need more than one sample or extras we do not have
        return None


def _extras(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("meta") or {}
    if "region" in meta and "type" in meta:  # the spatial benchmark
        return {"regions": [meta["region"]], "types": [meta["type"]]}
    return {}


def sample_views(
    runs: Sequence[Run],
    count: int = 4,
    ids: Iterable[str] | None = None,
    pick: str = "first",
    processor: Any = None,
) -> list[SampleView]:
    """Samples to draw for `runs` (all on the same data): `ids`, or `count` picked `first` / `differ`."""
    available = set(pruned_ids(runs))
    wanted: set[str] | None
    if ids is not None:
        wanted = set(resolve_ids([str(qid) for qid in ids], available))
    elif pick == "differ":
        wanted = set(most_different(runs, count))
    elif pick == "first":
        wanted = None
    else:
        raise ValueError(f"unknown pick {pick!r}; choose first, differ or give ids")
    if processor is None:
        try:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(runs[0].config.model.path))
        except Exception as error:
            log.info("no processor for %s (%s)", runs[0].config.model.path, error)
    metric = _metric(runs[0].config)
    if wanted is None:
        samples = [
            s for s in _benchmark_samples(runs[0].config, None, 4 * count + 8) if s.question_id in available
        ]
        samples = samples[:count]
    else:
        samples = _benchmark_samples(runs[0].config, wanted, len(wanted))
    rows = [run.by_id() for run in runs]
    grid_h, grid_w = runs[0].grid
    views = []
    for sample in samples:
        views.append(
            SampleView(
                question_id=sample.question_id,
                question=sample.text,
                answers=list(sample.answers),
                image=model_view(processor, sample.image),
                grid_h=grid_h,
                grid_w=grid_w,
                kept=[_images_of(r[sample.question_id])[0] for r in rows],
                predictions=[r[sample.question_id].get("prediction") for r in rows],
                correct=[_correct(metric, r[sample.question_id]) for r in rows],
            )
        )
    return views


def _metric(config: DictConfig) -> Any:
    try:
        from functools import partial

        from pore.app.config import build_benchmark
        from pore.metrics import METRICS

        # The run's benchmark as its protocol built it, so that answers are read by the protocol's rule.
        benchmark = build_benchmark(config)[0]
        return partial(METRICS[benchmark.metric], **benchmark.metric_options())
    except Exception:
        return None
