"""The pictures: valid PNG files of the expected pixel sizes, from synthetic data and from real runs.

The real runs are two evaluations of the embedded model (FastV and PoRe with the measured prior, the second
logged to W&B offline), drawn by the evaluation itself and by `src/viz.py`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from pipeline_fixtures import OFFLINE_ENV, REPO
from pore.app.evaluate import evaluate
from pore.app.identity import register_resolvers
from pore.app.viz import run_figures
from pore.app.viz.figures import (
    BY_ROW_SIZE,
    KEPT_BY_ROW_SIZE,
    KeptSummary,
    SampleView,
    heatmap_size,
    kept_map_size,
    plot_calibration_by_row,
    plot_calibration_heatmap,
    plot_kept_by_row,
    plot_kept_map,
    plot_samples,
    render_kept,
    samples_size,
)
from pore.app.viz.runs import kept_summary, load_run, most_different, resolve_ids

VIZ = REPO / "src" / "viz.py"


def load_viz_command():
    """src/viz.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("viz_command", VIZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes the whole file: a truncated PNG fails here
        return image.size


def synthetic_prior(grid: int = 6, gravity: bool = True, layer: int = 2) -> dict:
    rows = np.linspace(0.5, 1.5, grid)
    profile = np.repeat(rows[:, None], grid, axis=1)
    bucket = {
        "grid_h": grid,
        "grid_w": grid,
        "count": 10,
        "profile2d": profile.tolist(),
        "row_profile": rows.tolist(),
        "row_se": [0.05] * grid,
    }
    if gravity:
        bucket["gravity2d"] = profile[::-1].tolist()
        bucket["gravity_row"] = rows[::-1].tolist()
    fits = {
        "linear": {"alpha": 0.6, "mu": 0.6, "r2": 0.98},
        "exponential": {"sigma": 1.1, "mu": 0.5, "r2": None},
    }
    return {
        "model_name": "tiny",
        "data": {"name": "synthetic"},
        "layer": layer,
        "scoring_layer": layer - 1,
        "count": 10,
        "buckets": {f"{grid}x{grid}": bucket},
        "fits": fits,
    }


@pytest.mark.parametrize("gravity", [True, False])
def test_calibration_pictures(tmp_path: Path, gravity: bool) -> None:
    prior = synthetic_prior(gravity=gravity)
    heatmap = plot_calibration_heatmap(prior, tmp_path / "heatmap.png")
    assert png_size(heatmap) == heatmap_size(prior) == ((1120, 500) if gravity else (560, 500))
    assert png_size(plot_calibration_by_row([prior], tmp_path / "rows.png")) == BY_ROW_SIZE
    layers = [synthetic_prior(grid=24, layer=k) for k in (1, 2, 3)]  # large grids: no cell labels
    assert png_size(plot_calibration_by_row(layers, tmp_path / "layers.png", fits=False)) == BY_ROW_SIZE
    assert png_size(plot_calibration_heatmap(layers[0], tmp_path / "big.png")) == (1120, 500)


def summary(label: str, bottom_heavy: bool) -> KeptSummary:
    counts = np.zeros((8, 8), dtype=np.int64)
    counts[6 if bottom_heavy else 1] = 10
    counts[3] = 5
    return KeptSummary(label, 8, 8, counts, images=15, kept=int(counts.sum()))


def test_kept_token_pictures(tmp_path: Path) -> None:
    runs = [summary("fastv", True), summary("pore", False)]
    assert runs[0].row_share.sum() == pytest.approx(1.0)
    assert runs[0].mean_row == pytest.approx((6 * 80 + 3 * 40) / 120)
    assert png_size(plot_kept_by_row(runs, tmp_path / "rows.png")) == KEPT_BY_ROW_SIZE
    assert png_size(plot_kept_map(runs, tmp_path / "map.png")) == kept_map_size(2) == (880, 440)
    assert png_size(plot_kept_map(runs[:1], tmp_path / "one.png")) == (440, 440)


def test_render_kept_dims_only_the_dropped_cells() -> None:
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    picture = render_kept(image, 4, 4, kept=[0, 5], side=64)  # 16 px cells
    assert picture.shape == (64, 64, 3)
    kept_cell, dropped_cell = picture[2:14, 2:14], picture[2:14, 34:46]  # cell 0 and cell 2 (inside)
    assert np.all(np.abs(kept_cell.astype(int) - 200) <= 1)
    assert np.all(dropped_cell < 80)
    assert np.all(np.abs(picture[20:30, 20:30].astype(int) - 200) <= 1)  # cell 5 kept
    unpruned = render_kept(image, 4, 4, kept=None, side=64)
    assert unpruned[2:14, 34:46].min() >= 199


def test_sample_pictures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    views = [
        SampleView(
            question_id=str(i),
            question="what colour is the shape in the top left?\nAnswer the question using a single word.",
            answers=["red"],
            image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
            grid_h=8,
            grid_w=8,
            kept=[[0, 1, 2], list(range(60, 64))],
            predictions=["red", "blue"],
            correct=[True, False],
        )
        for i in range(3)
    ]
    path = plot_samples(views, ["fastv, keep 3", "pore_linear, keep 4"], tmp_path / "samples.png")
    assert png_size(path) == samples_size(3, 2) == (900, 3 * 350 + 50)
    with pytest.raises(ValueError, match="no sample"):
        plot_samples([], ["a"], tmp_path / "none.png")


# ---------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two evaluations on 12 questions: FastV (CSV logger) and PoRe-calibrated (W&B offline)."""
    monkeypatch = pytest.MonkeyPatch()
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    root = tmp_path_factory.mktemp("runs")
    register_resolvers()
    folders = {}
    settings = {
        "fastv": ["strategy=fastv", "logger=csv"],
        "calibrated": ["strategy=pore_calibrated", "strategy.prior.form=profile2d", "logger=wandb"],
    }
    for name, overrides in settings.items():
        folders[name] = root / name
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[*overrides, "strategy.keep=8", "data.limit=12", f"output_dir={folders[name]}"],
            )
        evaluate(cfg)
    yield folders
    monkeypatch.undo()


def test_an_evaluation_draws_its_pictures(runs: dict[str, Path]) -> None:
    figures = runs["fastv"] / "figures"
    assert png_size(figures / "kept_by_row.png") == KEPT_BY_ROW_SIZE
    assert png_size(figures / "kept_map.png") == kept_map_size(1)
    assert png_size(figures / "samples.png") == samples_size(4, 1)


def test_wandb_runs_get_the_pictures_as_images(runs: dict[str, Path]) -> None:
    offline = sorted((runs["calibrated"] / "wandb").glob("offline-run-*"))
    assert offline, "no offline W&B run"
    media = offline[-1] / "files" / "media" / "images"
    images = sorted(str(p.relative_to(media)) for p in media.rglob("*.png"))
    # Logged under the keys figures/<name>: W&B keeps them in media/images/figures/<name>_<step>_<hash>.png.
    for name in ("kept_by_row", "kept_map", "samples"):
        assert any(image.startswith(f"figures/{name}_") for image in images), images


def test_no_pictures_without_pruning(tmp_path: Path) -> None:
    rows = [{"question_id": "1", "kept_visual_indices": None, "error": None}]
    assert run_figures(None, tmp_path, rows) == {}


def test_viz_command_compares_two_runs(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "viz"
    argv = [str(runs["fastv"]), str(runs["calibrated"]), "--samples", "3", "--out", str(out)]
    assert load_viz_command().main(argv) == 0  # src/viz.py, in process
    printed = capsys.readouterr().out
    assert "fastv, keep 8, K=2: 12 answers, grid 8x8" in printed
    assert "pore_calibrated (profile2d), keep 8, K=2" in printed
    assert png_size(out / "kept_by_row.png") == KEPT_BY_ROW_SIZE
    assert png_size(out / "kept_map.png") == kept_map_size(2)
    assert png_size(out / "samples.png") == samples_size(3, 2)


def test_viz_picks_samples_by_id_and_by_difference(runs: dict[str, Path], tmp_path: Path) -> None:
    main = load_viz_command().main  # src/viz.py, in-process

    fastv, calibrated = load_run(runs["fastv"]), load_run(runs["calibrated"])
    assert fastv.grid == (8, 8) and len(fastv.rows) == 12
    summary_run = kept_summary(fastv)
    assert summary_run.images == 12 and summary_run.kept == 96
    ids = most_different([fastv, calibrated], 2)
    kept = {run.label: run.by_id() for run in (fastv, calibrated)}
    overlaps = []
    for qid in kept[fastv.label]:
        a = set(kept[fastv.label][qid]["kept_visual_indices"])
        b = set(kept[calibrated.label][qid]["kept_visual_indices"])
        overlaps.append((len(a & b) / len(a | b), qid))
    assert [qid for _, qid in sorted(overlaps)[:2]] == ids
    assert (
        main([str(runs["fastv"]), str(runs["calibrated"]), "--ids", *ids, "--out", str(tmp_path / "ids")])
        == 0
    )
    assert png_size(tmp_path / "ids" / "samples.png") == samples_size(2, 2)
    assert (
        main([str(runs["fastv"]), "--pick", "differ", "--samples", "1", "--out", str(tmp_path / "one")]) == 0
    )
    assert png_size(tmp_path / "one" / "samples.png") == samples_size(1, 1)
    with pytest.raises(SystemExit) as exited:  # one line, exit status 2
        main([str(runs["fastv"]), "--ids", "no-such-question", "--out", str(tmp_path / "bad")])
    assert exited.value.code == 2
    metrics = json.loads((runs["calibrated"] / "metrics.json").read_text())
    assert metrics["eff/visual_tokens"] == 8


def test_viz_takes_the_number_of_a_question_id_as_its_help_shows(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--ids 3 7` are test-000003 and test-000007 (the ids the spatial benchmark writes); an id no run
    answered is one line with examples of the real ids."""
    main = load_viz_command().main
    available = {row["question_id"] for row in load_run(runs["fastv"]).rows}
    assert resolve_ids(["3", "test-000007"], available) == ["test-000003", "test-000007"]
    out = tmp_path / "numbers"
    assert main([str(runs["fastv"]), "--ids", "3", "7", "--out", str(out)]) == 0
    assert png_size(out / "samples.png") == samples_size(2, 1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([str(runs["fastv"]), "--ids", "99", "--out", str(tmp_path / "bad")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "error: --ids 99: not the id (or the number of the id) of a question every run answered with "
        "pruning; such ids look like test-000000, test-000001, test-000002\n"
    )
