"""The pictures: a calibration's heatmap and by-row profile, kept tokens by row / by cell, sample overlays.

Every figure is drawn with matplotlib's Agg backend (no display needed) at a fixed size in pixels (the
`*_SIZE` constants and `samples_size`), saved without tight bounding boxes, so files have a known size.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

DPI = 100
HEATMAP_PANEL = (560, 500)  # (width, height) px per heatmap panel
BY_ROW_SIZE = (860, 500)
KEPT_BY_ROW_SIZE = (860, 460)
KEPT_MAP_PANEL = (440, 440)
SAMPLE_PANEL = (300, 350)
SAMPLE_HEADER = 50
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def _figure(width: int, height: int):
    return plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    plt.close(figure)
    return path


def _title(prior: dict[str, Any]) -> str:
    data = prior.get("data") or {}
    name = prior.get("model_name") or Path(str(prior.get("model", "model"))).name
    return (
        f"{name} on {data.get('name', '?')}: decoder layer {prior['scoring_layer']} "
        f"(prunes before K={prior['layer']}), {prior['count']} images"
    )


def _first_bucket(prior: dict[str, Any], bucket: str | None) -> tuple[str, dict[str, Any]]:
    buckets = prior["buckets"]
    if bucket is None:  # the files list buckets by image count, largest first
        bucket = next(iter(buckets))
    return bucket, buckets[bucket]


def _heatmap(figure, axes, values: np.ndarray, title: str, label: str, vmax: float | None = None) -> None:
    vmin, vmax = (0.0, vmax) if vmax is not None else (float(values.min()), float(values.max()))
    image = axes.imshow(values, cmap="magma", interpolation="nearest", vmin=vmin, vmax=vmax)
    colourbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colourbar.set_label(label)
    height, width = values.shape
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("column")
    axes.set_ylabel("row (0 = top)")
    step = max(1, round(max(height, width) / 12))
    axes.set_xticks(range(0, width, step))
    axes.set_yticks(range(0, height, step))
    if height * width <= 144:  # write the values in small grids
        middle = (vmin + vmax) / 2
        for r in range(height):
            for c in range(width):
                colour = "black" if values[r, c] > middle else "white"
                axes.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center", fontsize=7, color=colour)


def heatmap_size(prior: dict[str, Any], bucket: str | None = None) -> tuple[int, int]:
    _, entry = _first_bucket(prior, bucket)
    panels = 2 if entry.get("gravity2d") is not None else 1
    return HEATMAP_PANEL[0] * panels, HEATMAP_PANEL[1]


def plot_calibration_heatmap(prior: dict[str, Any], path: str | Path, bucket: str | None = None) -> Path:
    """Mean attention over the image grid (and, when the file has it, the RoPE-only gravity next to it)."""
    key, entry = _first_bucket(prior, bucket)
    gravity = entry.get("gravity2d")
    width, height = heatmap_size(prior, bucket)
    figure = _figure(width, height)
    panels = 2 if gravity is not None else 1
    axes = figure.subplots(1, panels, squeeze=False)[0]
    unit = "mean attention (1 = uniform)"
    _heatmap(figure, axes[0], np.asarray(entry["profile2d"]), f"measured, {key} grid", unit)
    if gravity is not None:
        _heatmap(figure, axes[1], np.asarray(gravity), "RoPE-only gravity (content-free q = k)", unit)
    figure.suptitle(_title(prior), fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(figure, path)


def _fit_label(form: str, fit: dict[str, Any]) -> str:
    parameter = "alpha" if form == "linear" else "sigma"
    r2 = "n/a" if fit.get("r2") is None else f"{fit['r2']:.3f}"
    shape = "mu / (1 - alpha p)" if form == "linear" else "mu exp(sigma p)"
    return f"{form} fit {shape}: {parameter} = {fit[parameter]:+.3f}, R² = {r2}"


def plot_calibration_by_row(
    priors: Sequence[dict[str, Any]], path: str | Path, fits: bool = True, bucket: str | None = None
) -> Path:
    """Mean attention by image row (± standard error over images); with one prior, its fits and gravity."""
    figure = _figure(*BY_ROW_SIZE)
    axes = figure.add_subplot(1, 1, 1)
    grid_h = 0
    for index, prior in enumerate(priors):
        key, entry = _first_bucket(prior, bucket)
        rows = np.asarray(entry["row_profile"])
        grid_h = max(grid_h, rows.size)
        error = np.asarray(entry.get("row_se") or np.zeros_like(rows))
        colour = COLOURS[index % len(COLOURS)]
        label = (
            "measured" if len(priors) == 1 else f"decoder layer {prior['scoring_layer']} (K={prior['layer']})"
        )
        axes.errorbar(
            np.arange(rows.size), rows, yerr=error, color=colour, marker="o", capsize=3, lw=2, label=label
        )
        if len(priors) == 1:
            dense = np.linspace(0, 1, 200)
            x = dense * (rows.size - 1)
            styles = {"linear": ("--", "#555555"), "exponential": (":", "#000000")}
            source = entry.get("fits") if bucket is not None else prior.get("fits")
            for form, fit in ((source or {}) if fits else {}).items():
                linestyle, fit_colour = styles.get(form, ("-.", "grey"))
                parameter = fit["alpha"] if form == "linear" else fit["sigma"]
                curve = fit["mu"] * (
                    1.0 / (1.0 - parameter * dense) if form == "linear" else np.exp(parameter * dense)
                )
                axes.plot(
                    x, curve, linestyle=linestyle, color=fit_colour, lw=1.5, label=_fit_label(form, fit)
                )
            if entry.get("gravity_row") is not None:
                axes.plot(
                    np.arange(rows.size),
                    entry["gravity_row"],
                    color="#2ca02c",
                    lw=1.5,
                    marker="s",
                    ms=3,
                    label="RoPE-only gravity (content-free)",
                )
            axes.set_title(f"{_title(prior)}\n{key} grid", fontsize=10)
        else:
            axes.set_title(_title(prior).split(":")[0] + ": mean attention by row per layer", fontsize=10)
    axes.axhline(1.0, color="grey", lw=1, alpha=0.6, label="uniform")
    axes.set_xlabel("image row (0 = top)")
    axes.set_ylabel("mean attention of the last prompt token\n(1 = uniform share)")
    axes.set_xticks(range(0, grid_h, max(1, round(grid_h / 24))))
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return _save(figure, path)


@dataclass
class KeptSummary:
    """Where one run's kept tokens fall: counts per grid cell over all its images."""

    label: str
    grid_h: int
    grid_w: int
    cell_counts: np.ndarray  # (H, W) number of images that kept each cell
    images: int  # images with a pruning record
    kept: int  # kept tokens in all

    @property
    def row_share(self) -> np.ndarray:
        """(H,) share of the kept tokens in each row."""
        return self.cell_counts.sum(axis=1) / max(self.kept, 1)

    @property
    def mean_row(self) -> float:
        rows = np.arange(self.grid_h)
        return float((self.row_share * rows).sum())


def plot_kept_by_row(runs: Sequence[KeptSummary], path: str | Path) -> Path:
    """Share of kept tokens in each image row, one bar per run and row, against the uniform share."""
    figure = _figure(*KEPT_BY_ROW_SIZE)
    axes = figure.add_subplot(1, 1, 1)
    grid_h = max(run.grid_h for run in runs)
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        x = np.arange(run.grid_h) + (index - (len(runs) - 1) / 2) * width
        label = f"{run.label}: mean row {run.mean_row:.2f}, {run.kept / max(run.images, 1):.0f} kept / image"
        axes.bar(x, 100 * run.row_share, width=width, color=COLOURS[index % len(COLOURS)], label=label)
    axes.axhline(100 / grid_h, color="black", lw=1, ls="--", label=f"uniform ({100 / grid_h:.1f} %)")
    axes.set_xlabel("image row (0 = top)")
    axes.set_ylabel("share of kept image tokens (%)")
    axes.set_xticks(range(0, grid_h, max(1, round(grid_h / 24))))
    images = " / ".join(f"{run.images}" for run in runs)
    axes.set_title(
        f"Kept tokens by image row ({images} images; middle row = {(grid_h - 1) / 2:.1f})", fontsize=10
    )
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def kept_map_size(runs: int) -> tuple[int, int]:
    return KEPT_MAP_PANEL[0] * runs, KEPT_MAP_PANEL[1]


def plot_kept_map(runs: Sequence[KeptSummary], path: str | Path) -> Path:
    """How often each grid cell is kept (share of images), one heatmap per run."""
    figure = _figure(*kept_map_size(len(runs)))
    axes = figure.subplots(1, len(runs), squeeze=False)[0]
    shares = [run.cell_counts / max(run.images, 1) for run in runs]
    top = max(float(share.max()) for share in shares) or 1.0  # one colour scale for every run
    for ax, run, share in zip(axes, runs, shares, strict=True):
        _heatmap(figure, ax, share, textwrap.shorten(run.label, 48), "share of images keeping the cell", top)
    figure.tight_layout()
    return _save(figure, path)


@dataclass
class SampleView:
    """One question as the pictures show it: the image the model saw and what each run kept."""

    question_id: str
    question: str
    answers: list[str]
    image: np.ndarray  # (S, S', 3) uint8: the image as the model's processor prepared it
    grid_h: int
    grid_w: int
    kept: list[list[int] | None]  # per run: kept raster indices (None = nothing pruned)
    predictions: list[str | None]  # per run
    correct: list[bool | None]  # per run, when the benchmark's metric can tell


def render_kept(image: np.ndarray, grid_h: int, grid_w: int, kept: Sequence[int] | None, side: int = 384):
    """(H', W', 3) uint8: the image scaled to whole cells, dropped cells dimmed, thin cell borders."""
    cell = max(1, round(side / max(grid_h, grid_w)))
    height, width = grid_h * cell, grid_w * cell
    picture = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), dtype=np.float32)
    if kept is not None:
        keep = np.zeros(grid_h * grid_w, dtype=bool)
        keep[np.asarray(list(kept), dtype=np.int64)] = True
        dropped = np.repeat(np.repeat(~keep.reshape(grid_h, grid_w), cell, axis=0), cell, axis=1)
        # Dimmed towards dark grey (not black), so dark content in dropped cells stays faintly visible.
        picture[dropped] = picture[dropped] * 0.2 + 30
    if cell >= 8:
        picture[::cell, :, :] = picture[::cell, :, :] * 0.6 + 60
        picture[:, ::cell, :] = picture[:, ::cell, :] * 0.6 + 60
    return np.clip(picture, 0, 255).astype(np.uint8)


def samples_size(samples: int, runs: int) -> tuple[int, int]:
    return SAMPLE_PANEL[0] * (1 + runs), SAMPLE_PANEL[1] * samples + SAMPLE_HEADER


def plot_samples(samples: Sequence[SampleView], labels: Sequence[str], path: str | Path) -> Path:
    """One row per sample: the image as the model saw it, then each run's kept tokens (dropped: dimmed)."""
    if not samples:
        raise ValueError("no sample to draw")
    width, height = samples_size(len(samples), len(labels))
    figure = _figure(width, height)
    top = 1 - SAMPLE_HEADER / height
    grid = figure.subplots(len(samples), 1 + len(labels), squeeze=False)
    # Room at the bottom for the last row's labels (fixed in pixels, whatever the number of rows).
    figure.subplots_adjust(
        left=0.01, right=0.99, top=top - 0.01, bottom=30 / height, wspace=0.05, hspace=0.35
    )
    figure.suptitle("kept image tokens (dropped ones dimmed)", fontsize=11, y=1 - 12 / height)
    for row, sample in enumerate(samples):
        axes = grid[row]
        axes[0].imshow(render_kept(sample.image, sample.grid_h, sample.grid_w, None))
        question = textwrap.shorten(sample.question.split("\n")[0], 90)
        axes[0].set_title("\n".join(textwrap.wrap(question, 36)[:2]), fontsize=8)
        axes[0].set_xlabel(f"answer: {textwrap.shorten(', '.join(sample.answers[:3]), 30)}", fontsize=8)
        for column, label in enumerate(labels, start=1):
            kept = sample.kept[column - 1]
            axes[column].imshow(render_kept(sample.image, sample.grid_h, sample.grid_w, kept))
            total = sample.grid_h * sample.grid_w
            count = total if kept is None else len(kept)
            axes[column].set_title(f"{textwrap.shorten(label, 40)}\nkept {count}/{total}", fontsize=8)
            prediction = sample.predictions[column - 1]
            correct = sample.correct[column - 1]
            colour = {True: "#1a7f37", False: "#cf222e"}.get(correct, "black")
            verdict = {True: " (right)", False: " (wrong)"}.get(correct, "")
            text = f"predicted: {textwrap.shorten(str(prediction), 28)}{verdict}"
            axes[column].set_xlabel(text, fontsize=8, color=colour)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(figure, path)
