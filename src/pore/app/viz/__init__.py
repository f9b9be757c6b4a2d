"""Pictures of pruning runs and calibrations (matplotlib, Agg backend; PNG files of fixed pixel sizes).

- `draw_runs(runs, out)`: kept tokens by image row and by grid cell for one or more runs, and sample
  pictures (the image as the model saw it, kept tokens highlighted, runs side by side). `src/viz.py` is its
  command line; `evaluate()` calls it at the end of a pruned run (`run_figures`).
- `pore.app.viz.figures`: the individual figures, including a calibration's heatmap and by-row profile.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger("pore")

FIGURES = ("kept_by_row", "kept_map", "samples")


def draw_runs(
    runs: Sequence[Any],
    out: str | Path,
    samples: int = 4,
    ids: Iterable[str] | None = None,
    pick: str = "first",
    processor: Any = None,
) -> dict[str, Path]:
    """Write kept_by_row.png, kept_map.png and (when `samples` or `ids`) samples.png into `out`."""
    from pore.app.viz.figures import plot_kept_by_row, plot_kept_map, plot_samples
    from pore.app.viz.runs import kept_summary, sample_views

    out = Path(out)
    grids = {run.grid for run in runs}
    if len(grids) != 1:
        raise ValueError(f"the runs have different image grids {sorted(grids)}; compare runs of one model")
    summaries = [kept_summary(run) for run in runs]
    written = {
        "kept_by_row": plot_kept_by_row(summaries, out / "kept_by_row.png"),
        "kept_map": plot_kept_map(summaries, out / "kept_map.png"),
    }
    if samples > 0 or ids is not None:
        views = sample_views(runs, samples, ids, pick, processor)
        if views:
            written["samples"] = plot_samples(views, [run.label for run in runs], out / "samples.png")
        else:
            log.warning("no sample of the runs was found in their data: samples.png not drawn")
    return written


def run_figures(
    cfg: DictConfig,
    output_dir: Path,
    rows: list[dict[str, Any]],
    processor: Any = None,
    ran: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """The pictures of a finished evaluation, in `<output_dir>/figures/` (see `draw_runs`).

    `figures.enabled` (default true) and `figures.samples` (default 4) are read from the config when set,
    e.g. `python src/run.py figures.samples=0` (conf/config.yaml). `ran`: the resolved strategy (what the
    engine pruned with), for the labels.
    """
    from omegaconf import OmegaConf

    from pore.app.viz.runs import Run, model_grid, run_label

    answered = [row for row in rows if row.get("error") is None]
    if not any(row.get("kept_visual_indices") for row in answered):
        return {}  # nothing was pruned: nothing to show
    if not OmegaConf.select(cfg, "figures.enabled", default=True):
        return {}
    run = Run(Path(output_dir), cfg, answered, run_label(cfg, ran), model_grid(cfg, answered))
    samples = int(OmegaConf.select(cfg, "figures.samples", default=4))
    return draw_runs([run], Path(output_dir) / "figures", samples=samples, processor=processor)
