"""The prior file (`pore-prior/1`, JSON) and the weights of the `calibrated` prior.

One file holds one scoring layer of one model measured on one data set::

    {
      "format": "pore-prior/1",
      "model": "<model.path>", "model_name": "tiny_llava", "adapter": "llava",
      "layer": 2,              # strategy.layer K: pruning before decoder layer K ...
      "scoring_layer": 1,      # ... ranks by the attention in decoder layer K - 1: what was measured
      "data": {"name": "spatial", "path": ..., "config": null, "split": "test", "limit": null},
      "count": 400,            # image grids averaged, over all buckets
      "buckets": {             # one per grid size ("<H>x<W>"): resolution buckets / tiles
        "8x8": {"grid_h": 8, "grid_w": 8, "count": 400,
                "profile2d": [[...], ...],  # (H, W) mean attention per cell, 1 = uniform
                "row_profile": [...], "row_se": [...], "col_profile": [...],
                "image_attention_share": 0.41,  # mean share of the last token's attention on this grid
                "gravity2d": [[...]], "gravity_row": [...],  # RoPE-only attention, same units (optional)
                "fits": {...}}},
      "fits": {"linear": {"alpha": ..., "mu": ..., "r2": ..., ...}, "exponential": {"sigma": ..., ...}},
      "fits_index": {...},     # the same on the raster index (p = i / (N - 1)) instead of the row
      "gravity": {"method": ..., ...} | null
    }

Profiles are normalised per image: the last prompt token's attention to the image's tokens is divided by its
sum over them (a share), times the number of tokens, then averaged over images. A cell of 1 gets exactly the
uniform share; 2 gets twice that. The unit does not depend on the grid size, which is what lets a profile be
resampled to another grid.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pore.priors.base import PRIORS, normalized_position
from pore.priors.grid import gather_tables, resample

FORMAT = "pore-prior/1"
FORMS: tuple[str, ...] = ("profile", "profile2d", "linear", "exponential", "gravity")
LAYER_FILE = "layer{layer}.json"

log = logging.getLogger("pore")


def bucket_key(grid_h: int, grid_w: int) -> str:
    return f"{grid_h}x{grid_w}"


@dataclass(frozen=True)
class Bucket:
    """The measured profiles of one grid size, as (H, W) / (H,) float64 tensors."""

    grid_h: int
    grid_w: int
    count: int
    profile2d: torch.Tensor  # (H, W)
    row_profile: torch.Tensor  # (H,)
    gravity2d: torch.Tensor | None  # (H, W)


@dataclass(frozen=True)
class PriorFile:
    """A loaded prior file: metadata plus its buckets."""

    path: Path
    data: dict[str, Any]  # the JSON as written
    buckets: dict[str, Bucket]

    @property
    def layer(self) -> int | None:
        return self.data.get("layer")

    def best_bucket(self) -> Bucket:
        """The bucket measured on the most images (the reference for resampling)."""
        return max(self.buckets.values(), key=lambda bucket: (bucket.count, bucket.grid_h * bucket.grid_w))

    def fit(self, form: str, position: str) -> dict[str, Any]:
        key = "fits" if position == "row" else "fits_index"
        fits = self.data.get(key) or {}
        if form not in fits:
            raise ValueError(f"prior file {self.path} has no {form} fit in {key!r}; recalibrate it")
        return fits[form]


def resolve_prior_path(path: str | os.PathLike, layer: int | None = None) -> Path:
    """The prior file to read: `path` itself, or `<path>/layer<K>.json` when `path` is a folder."""
    resolved = Path(path).expanduser()
    if resolved.is_dir():
        if layer is None:
            raise ValueError(
                f"strategy.prior.path {str(path)!r} is a folder: name a prior file in it, or use the prior "
                "inside a strategy (its layer picks layer<K>.json)"
            )
        candidate = resolved / LAYER_FILE.format(layer=layer)
        if not candidate.exists():
            found = sorted(p.name for p in resolved.glob("layer*.json"))
            raise FileNotFoundError(
                f"no prior for strategy.layer={layer} in {resolved} (it has {found or 'no layer*.json'}); "
                f"calibrate it: python src/calibrate.py strategy.layer={layer} ..."
            )
        return candidate
    if not resolved.exists():
        raise FileNotFoundError(
            f"prior file {str(path)!r} not found; write one with python src/calibrate.py (see the docs)"
        )
    return resolved


def _tensor(values: Any, name: str, path: Path) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"prior file {path}: {name} has non-finite values")
    return tensor


def parse_prior(data: dict[str, Any], path: Path) -> PriorFile:
    """Check and convert the JSON of a prior file."""
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a prior file (format {data.get('format')!r}, expected {FORMAT!r})")
    buckets = {}
    for key, entry in (data.get("buckets") or {}).items():
        profile2d = _tensor(entry["profile2d"], f"buckets[{key}].profile2d", path)
        grid_h, grid_w = int(entry["grid_h"]), int(entry["grid_w"])
        if profile2d.shape != (grid_h, grid_w):
            raise ValueError(
                f"{path}: bucket {key} profile2d is {tuple(profile2d.shape)}, not {grid_h}x{grid_w}"
            )
        gravity = entry.get("gravity2d")
        buckets[key] = Bucket(
            grid_h=grid_h,
            grid_w=grid_w,
            count=int(entry.get("count", 0)),
            profile2d=profile2d,
            row_profile=_tensor(entry.get("row_profile") or profile2d.mean(dim=1).tolist(), "row", path),
            gravity2d=None if gravity is None else _tensor(gravity, f"buckets[{key}].gravity2d", path),
        )
    if not buckets:
        raise ValueError(f"prior file {path} has no buckets")
    return PriorFile(path, data, buckets)


# Loaded files by (path, modification time, size): a rewritten file is read again.
_FILES: dict[tuple[str, int, int], PriorFile] = {}
_TABLES: dict[tuple, torch.Tensor] = {}
_WARNED: set[tuple[str, int, int]] = set()


def load_prior_file(path: str | os.PathLike, layer: int | None = None) -> PriorFile:
    """Read (once; cached while the file is unchanged) the prior file at `path` (or `path/layer<K>.json`)."""
    resolved = resolve_prior_path(path, layer).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key not in _FILES:
        try:
            with resolved.open(encoding="utf-8") as handle:
                _FILES[key] = parse_prior(json.load(handle), resolved)
        except json.JSONDecodeError as error:  # e.g. a file cut short while it was written
            raise ValueError(
                f"prior file {resolved} is not valid JSON ({error}); it may be truncated: measure it again "
                "with python src/calibrate.py"
            ) from None
        except (KeyError, TypeError, AttributeError) as error:  # a field missing or of the wrong kind
            raise ValueError(
                f"prior file {resolved} is incomplete (missing or malformed {error}); measure it again "
                "with python src/calibrate.py"
            ) from None
    return _FILES[key]


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with one line per list of numbers (a profile row), so that files read and diff as tables."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(str(key))}: {dumps(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(item, (dict, list, tuple)) for item in value):
            return json.dumps(list(value), allow_nan=False)
        return "[\n" + ",\n".join(inner + dumps(item, indent + 1) for item in value) + "\n" + pad + "]"
    return json.dumps(value, allow_nan=False)


def save_prior_file(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a prior file atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".tmp")
    partial.write_text(dumps(data) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def _profile_table(prior: PriorFile, form: str, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h, grid_w) measured profile for `form` (profile, profile2d, gravity), resampled if needed."""
    key = bucket_key(grid_h, grid_w)
    bucket = prior.buckets.get(key)
    if bucket is None:
        bucket = prior.best_bucket()
        warn_key = (str(prior.path), grid_h, grid_w)
        if grid_h * grid_w > 1 and warn_key not in _WARNED:  # a 1-token grid has nothing to rank
            _WARNED.add(warn_key)
            log.warning(
                "prior file %s has no %s grid (it has %s): resampling its %s profile; calibrate this model "
                "for a measured one",
                prior.path,
                key,
                ", ".join(prior.buckets),
                bucket_key(bucket.grid_h, bucket.grid_w),
            )
    if form == "profile":
        rows = resample(bucket.row_profile[:, None], grid_h, 1)  # (grid_h, 1): linear along the rows
        return rows.expand(grid_h, grid_w)
    if form == "profile2d":
        return resample(bucket.profile2d, grid_h, grid_w)
    if form == "gravity":
        if bucket.gravity2d is None:
            raise ValueError(
                f"prior file {prior.path} has no gravity profile (calibrate with calibrate.gravity=true)"
            )
        return resample(bucket.gravity2d, grid_h, grid_w)
    raise ValueError(f"unknown calibrated form {form!r}")


def weight_table(
    prior: PriorFile, form: str, grid_h: int, grid_w: int, position: str = "row", floor: float = 0.05
) -> torch.Tensor:
    """(grid_h, grid_w) float64 weights of the calibrated prior on one grid, largest = 1."""
    if form not in FORMS:
        raise ValueError(f"unknown strategy.prior.form {form!r}; valid forms: {', '.join(FORMS)}")
    if not floor > 0 or math.isinf(floor):
        raise ValueError(f"calibrated prior: floor must be > 0 and finite, got {floor}")
    if position not in ("row", "index"):
        raise ValueError(f"unknown prior position {position!r}; valid positions: row, index")
    cache_key = (str(prior.path), id(prior), form, grid_h, grid_w, position, floor)
    if cache_key in _TABLES:
        return _TABLES[cache_key]
    if form in ("linear", "exponential"):
        index = torch.arange(grid_h * grid_w)
        full = torch.full_like(index, 1)
        p = normalized_position(index // grid_w, index % grid_w, full * grid_h, full * grid_w, position)
        fit = prior.fit(form, position)
        if form == "linear":
            alpha = float(fit["alpha"])
            if not alpha < 1.0:
                raise ValueError(f"prior file {prior.path}: linear alpha must be < 1, got {alpha}")
            weights = (1.0 - alpha * p) / max(1.0, 1.0 - alpha)
        else:
            sigma = float(fit["sigma"])
            weights = torch.exp(-sigma * p) / max(1.0, math.exp(-sigma))
        table = weights.view(grid_h, grid_w)
    else:
        profile = _profile_table(prior, form, grid_h, grid_w)
        weights = 1.0 / profile.clamp(min=floor)
        table = weights / weights.max()
    table = table.double().contiguous()
    _TABLES[cache_key] = table
    return table


def calibrated_weights(
    row: torch.Tensor,
    col: torch.Tensor,
    grid_h: torch.Tensor,
    grid_w: torch.Tensor,
    *,
    path: str | None,
    form: str = "profile",
    floor: float = 0.05,
    position: str = "row",
    layer: int | None = None,
    check_layer: bool = True,
) -> torch.Tensor:
    """The `calibrated` prior's weight of every token (float64, shape of `row`); see `pore.priors`."""
    if not path:
        raise ValueError(
            "the calibrated prior needs strategy.prior.path: a prior file written by src/calibrate.py, or "
            "the folder of its layer<K>.json files"
        )
    prior = load_prior_file(path, layer)
    if check_layer and layer is not None and prior.layer is not None and int(prior.layer) != int(layer):
        raise ValueError(
            f"prior file {prior.path} was measured for strategy.layer={prior.layer} (scoring layer "
            f"{int(prior.layer) - 1}), but the strategy prunes before layer {layer}: calibrate that layer "
            f"(python src/calibrate.py strategy.layer={layer} ...), point strategy.prior.path at the "
            "calibration folder, or set strategy.prior.check_layer=false"
        )
    return gather_tables(
        row, col, grid_h, grid_w, lambda h, w: weight_table(prior, form, h, w, position, float(floor))
    )


@PRIORS.register("calibrated")
def calibrated_prior(
    row: torch.Tensor,
    col: torch.Tensor,
    grid_h: torch.Tensor,
    grid_w: torch.Tensor,
    position: str = "row",
    layer: int | None = None,
    path: str | None = None,
    form: str = "profile",
    floor: float = 0.05,
    check_layer: bool = True,
) -> torch.Tensor:
    """w = 1 / (the model's measured attention profile), from a prior file written by `src/calibrate.py`.

    `path` is a prior file, or a folder of them (`layer<K>.json`: the one for this strategy's layer K is
    read). `form`: `profile` divides by the mean attention of each row, `profile2d` by that of each grid cell,
    `gravity` by the RoPE-only attention of a content-free query/key pair (stored in the file);
    `linear` / `exponential` use the fitted alpha / sigma (w = 1 - alpha p, exp(-sigma p), p by `position`).
    Profiles are clamped at `floor` (1 = uniform attention) before dividing, so a weight is at most
    max(profile) / floor times another. Weights are finite, positive and scaled so that the largest weight of
    a grid is 1 (as for `linear` and `exponential`); the top-k inside an image does not depend on the scale.
    A grid size that the file has no profile for is resampled from its best-measured grid (bilinear on the
    normalised coordinates), with a warning. `check_layer`: refuse a file measured for another layer.
    """
    return calibrated_weights(
        row,
        col,
        grid_h,
        grid_w,
        path=path,
        form=form,
        floor=floor,
        position=position,
        layer=layer,
        check_layer=check_layer,
    )
