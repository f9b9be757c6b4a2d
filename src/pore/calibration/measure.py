"""Measure a model's position bias: the last prompt token's attention over every image grid position.

`Calibrator` runs the model unpruned (through `generate`, so the prefill is exactly the evaluation's) with
the pruner's attention tap (`pore.engine.tap`) on the decoder layers K - 1 of the requested
pruning layers K, and averages, per grid size ("bucket"), the attention of the last prompt token to each
image token, normalised per image: the image's attention is divided by its sum over the image's tokens and
multiplied by their number, so 1 means the uniform share (see `pore.priors.calibrated`).

`RopeGravity` is the part of that bias that RoPE alone produces: the softmax attention between a query and
keys that have the same direction and no content, so that the logit depends only on the rotary positions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pore.adapters import ModelAdapter, adapter_for
from pore.calibration.fit import fit_forms
from pore.engine.tap import Tap, last_query_attention
from pore.priors.calibrated import FORMAT, bucket_key


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _default_apply_rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RopeGravity:
    """Content-free attention under the model's own rotary embedding.

    For a unit direction u, the query at position m and the key at position n are R_m u and R_n u (the
    model's `rotary_emb` tables, applied with the model's own `apply_rotary_pos_emb`), so their cosine
    c_u(m, n) depends only on the positions (for standard RoPE: on n - m). The logit of head h is
    s_h * c_u(m, n), with s_h = scaling * |q_h| * mean |k_h| measured on the real prompt at the scoring layer
    (post-RoPE norms; using them keeps the softmax as sharp as the layer's own), and the attention is the
    softmax over the image's tokens, averaged over heads and over `directions` random unit directions.

    Why random directions and not one vector (e.g. all ones): the all-ones vector puts equal energy in every
    rotary frequency pair, a single arbitrary choice; heads put theirs in particular bands. Averaging over
    isotropic directions gives the expected RoPE distance profile (pair energies Dirichlet-distributed around
    the uniform split), with a fixed seed so the result is reproducible.
    """

    def __init__(
        self,
        rotary_emb: nn.Module,
        head_dim: int,
        apply_rotary: Callable | None = None,
        directions: int | torch.Tensor = 64,
        seed: int = 0,
    ) -> None:
        self.rotary_emb = rotary_emb
        self.apply_rotary = apply_rotary or _default_apply_rotary
        if isinstance(directions, torch.Tensor):  # given directions (R, D), e.g. a known planted one
            u = directions.detach().double().cpu().reshape(-1, head_dim)
        else:
            if directions < 1:
                raise ValueError(f"gravity needs >= 1 direction, got {directions}")
            generator = torch.Generator().manual_seed(seed)
            u = torch.randn(directions, head_dim, generator=generator, dtype=torch.float64)
        self.directions = u / u.norm(dim=1, keepdim=True)  # (R, D)

    def cosine(self, query_position: int, key_positions: torch.Tensor) -> torch.Tensor:
        """(R, N) cosine between the rotated query direction at `query_position` and each rotated key."""
        positions = torch.cat([key_positions.reshape(-1).cpu().long(), torch.tensor([query_position])])
        device = next(iter(self.rotary_emb.buffers()), torch.empty(0)).device
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = self.rotary_emb(probe, positions[None].to(device))  # (1, N + 1, D)
        cos, sin = cos.double().cpu(), sin.double().cpu()
        u = self.directions[None, :, None, :].expand(1, -1, positions.numel(), -1)  # (1, R, N + 1, D)
        rotated, _ = self.apply_rotary(u, u, cos, sin)  # (1, R, N + 1, D)
        rotated = rotated[0] / rotated[0].norm(dim=-1, keepdim=True)  # attention_scaling cancels
        return torch.einsum("rnd,rd->rn", rotated[:, :-1], rotated[:, -1])  # (R, N)

    def attention(
        self, query_position: int, key_positions: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """(N,) softmax over the keys of s_h * cosine, averaged over heads (`logit_scale`: (H,)) and
        directions."""
        cosine = self.cosine(query_position, key_positions)  # (R, N)
        logits = logit_scale.double().cpu()[:, None, None] * cosine[None]  # (H, R, N)
        return torch.softmax(logits, dim=-1).mean(dim=(0, 1))


def rope_gravity_for(
    adapter: ModelAdapter, head_dim: int, directions: int | torch.Tensor, seed: int
) -> RopeGravity:
    """A RopeGravity on the language model's own rotary embedding (1-D RoPE only)."""
    language_model = adapter.language_model()
    rotary = getattr(language_model, "rotary_emb", None)
    if rotary is None:
        raise NotImplementedError(f"{type(language_model).__name__} has no rotary_emb module")
    rope = dict(getattr(language_model.config, "rope_parameters", None) or {})
    if "mrope_section" in rope or getattr(rotary, "mrope_section", None) is not None:
        raise NotImplementedError("multimodal RoPE (Qwen2-VL's 3-D positions) is not supported by gravity")
    attention = adapter.attention_module(adapter.decoder_layers()[0])
    apply = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    return RopeGravity(rotary, head_dim, apply, directions, seed)


@dataclass
class _Bucket:
    """Running sums for one grid size."""

    grid_h: int
    grid_w: int
    count: int = 0
    cells: torch.Tensor = field(init=False)  # (H, W) contributions per cell
    total: torch.Tensor = field(init=False)  # (H, W) sum of normalised attention
    row_total: torch.Tensor = field(init=False)  # (H,) sum of per-image row means
    row_squares: torch.Tensor = field(init=False)  # (H,) sum of their squares (for the standard error)
    share_total: float = 0.0  # sum of the share of the last token's attention on the image
    gravity_total: torch.Tensor = field(init=False)  # (H, W)
    gravity_count: int = 0

    def __post_init__(self) -> None:
        shape = (self.grid_h, self.grid_w)
        self.cells = torch.zeros(shape, dtype=torch.float64)
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.row_total = torch.zeros(self.grid_h, dtype=torch.float64)
        self.row_squares = torch.zeros(self.grid_h, dtype=torch.float64)
        self.gravity_total = torch.zeros(shape, dtype=torch.float64)

    @staticmethod
    def _grid(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, h: int, w: int):
        grid, seen = torch.zeros(h, w, dtype=torch.float64), torch.zeros(h, w, dtype=torch.float64)
        grid.index_put_((rows, cols), values, accumulate=True)
        seen.index_put_((rows, cols), torch.ones_like(values), accumulate=True)
        return grid, seen

    def add(self, normalised: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, share: float) -> None:
        grid, seen = self._grid(normalised, rows, cols, self.grid_h, self.grid_w)
        self.total += grid
        self.cells += seen
        row_means = grid.sum(dim=1) / seen.sum(dim=1).clamp(min=1)  # (H,)
        self.row_total += row_means
        self.row_squares += row_means**2
        self.share_total += share
        self.count += 1

    def add_gravity(self, normalised: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        grid, _ = self._grid(normalised, rows, cols, self.grid_h, self.grid_w)
        self.gravity_total += grid
        self.gravity_count += 1

    def profile2d(self) -> torch.Tensor:
        # Cells never seen (partial grids) get the uniform value 1.
        profile = torch.where(
            self.cells > 0, self.total / self.cells.clamp(min=1), torch.ones_like(self.total)
        )
        return profile / profile.mean()

    def gravity2d(self) -> torch.Tensor | None:
        if not self.gravity_count:
            return None
        cells = self.cells / max(self.count, 1) * self.gravity_count  # same coverage as the attention
        gravity = torch.where(cells > 0, self.gravity_total / cells.clamp(min=1e-12), torch.ones_like(cells))
        return gravity / gravity.mean()

    def row_se(self) -> torch.Tensor:
        n = self.count
        if n < 2:
            return torch.zeros(self.grid_h, dtype=torch.float64)
        mean = self.row_total / n
        variance = ((self.row_squares - n * mean**2) / (n - 1)).clamp(min=0)
        return (variance / n).sqrt()


def _rounded(tensor: torch.Tensor) -> list:
    """Nested lists of floats with 6 significant digits: readable, diffable files."""
    if tensor.dim() == 0:
        return float(f"{float(tensor):.6g}")
    return [_rounded(t) for t in tensor] if tensor.dim() > 1 else [float(f"{v:.6g}") for v in tensor.tolist()]


def _bottom_half(rows: torch.Tensor) -> float:
    """Share of the image attention in the bottom half of the rows (a middle row counts half)."""
    height = rows.numel()
    # Row r's centre r + 1/2 against the middle H / 2: below it counts 1, on it 1/2.
    weights = [1.0 if 2 * r + 1 > height else 0.5 if 2 * r + 1 == height else 0.0 for r in range(height)]
    return float((rows * torch.tensor(weights, dtype=torch.float64)).sum() / rows.sum().clamp(min=1e-12))


def _positions(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / max(n - 1, 1)


def _pooled_fits(points: list[tuple[np.ndarray, np.ndarray, float]], position: str) -> dict[str, Any]:
    """Fit both forms to the points of every bucket at once, each bucket weighted by its image count."""
    p = np.concatenate([pts for pts, _, _ in points])
    y = np.concatenate([values for _, values, _ in points])
    weights = np.concatenate([np.full(pts.size, count) for pts, _, count in points])
    if p.size < 2 or p.max() <= 0:
        return {}
    return {form: fit.to_dict() for form, fit in fit_forms(p, y, weights, position).items()}


@dataclass
class LayerCalibration:
    """What one scoring layer measured, per grid bucket."""

    layer: int  # K (strategy.layer): prune before decoder layer K
    buckets: dict[str, _Bucket]
    gravity: dict[str, Any] | None = None  # how gravity was computed; None when it was not

    @property
    def scoring_layer(self) -> int:
        return self.layer - 1

    @property
    def count(self) -> int:
        return sum(bucket.count for bucket in self.buckets.values())

    def to_prior(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """The prior file's JSON (format `pore-prior/1`, see `pore.priors.calibrated`)."""
        if not self.count:
            raise ValueError(f"layer {self.layer}: no image was measured (is the data empty?)")
        buckets, rows, cells, gravity_rows = {}, [], [], []
        for key, bucket in sorted(self.buckets.items(), key=lambda item: -item[1].count):
            profile = bucket.profile2d()  # (H, W)
            row_profile = profile.mean(dim=1)
            entry: dict[str, Any] = {
                "grid_h": bucket.grid_h,
                "grid_w": bucket.grid_w,
                "count": bucket.count,
                "profile2d": _rounded(profile),
                "row_profile": _rounded(row_profile),
                "row_se": _rounded(bucket.row_se()),
                "col_profile": _rounded(profile.mean(dim=0)),
                "image_attention_share": float(f"{bucket.share_total / bucket.count:.6g}"),
                "bottom_half_share": float(f"{_bottom_half(row_profile):.6g}"),
            }
            p_rows = _positions(bucket.grid_h)
            if bucket.grid_h > 1:
                fits = fit_forms(p_rows, row_profile.numpy())
                entry["fits"] = {form: fit.to_dict() for form, fit in fits.items()}
            gravity = bucket.gravity2d()
            if gravity is not None:
                entry["gravity2d"] = _rounded(gravity)
                entry["gravity_row"] = _rounded(gravity.mean(dim=1))
                gravity_rows.append((p_rows, gravity.mean(dim=1).numpy(), bucket.count))
            buckets[key] = entry
            rows.append((p_rows, row_profile.numpy(), bucket.count))
            cells.append(
                (_positions(bucket.grid_h * bucket.grid_w), profile.reshape(-1).numpy(), bucket.count)
            )
        gravity_info = None
        if self.gravity is not None:
            gravity_info = {**self.gravity, "fits": _pooled_fits(gravity_rows, "row")}
        return {
            "format": FORMAT,
            **metadata,
            "layer": self.layer,
            "scoring_layer": self.scoring_layer,
            "count": self.count,
            "normalisation": (
                "per image: the last prompt token's attention to the image's tokens (mean over heads) "
                "divided "
                "by its sum over them, times their number; averaged over images. 1 = uniform share"
            ),
            "buckets": buckets,
            "fits": _pooled_fits(rows, "row"),
            "fits_index": _pooled_fits(cells, "index"),
            "gravity": gravity_info,
        }


@dataclass
class _Capture:
    attention: torch.Tensor  # (B, L) float32, mean over heads
    query_norm: torch.Tensor | None  # (B, H) post-RoPE norm of the last query
    key_norm: torch.Tensor | None  # (B, H_kv, L) post-RoPE norm of every key
    scaling: float
    head_dim: int


class Calibrator:
    """Average the last prompt token's attention over image grid positions at the scoring layer(s).

    >>> with Calibrator(model, layers=[2]) as calibrator:
    ...     for batch in batches:  # processor outputs, left-padded
    ...         calibrator.update(batch, pad_token_id=processor.tokenizer.pad_token_id)
    >>> calibrator.results()[2].to_prior({"model": ...})

    `layers` are pruning layers K (the `strategy.layer` convention); the attention measured is that of
    decoder layer K - 1, which is what FastV-style scoring reads. `gravity_directions`: how many random
    content-free directions the RoPE-only gravity averages (or an (R, head_dim) tensor of given ones).
    The model runs unpruned; its attention implementation is switched to the `pore_<base>` wrapper (same
    kernels) and restored on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        adapter: str | ModelAdapter | None = None,
        gravity: bool = True,
        gravity_directions: int | torch.Tensor = 64,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.adapter = adapter if isinstance(adapter, ModelAdapter) else adapter_for(model, adapter)
        decoder_layers = self.adapter.decoder_layers()
        self.layers = sorted({int(layer) for layer in layers})
        if not self.layers:
            raise ValueError("calibrate at least one layer (calibrate.layers or strategy.layer)")
        for layer in self.layers:
            if not 1 <= layer < len(decoder_layers):
                raise ValueError(
                    f"layer {layer} is not a pruning layer of this {len(decoder_layers)}-layer language "
                    "model "
                    f"(K in [1, {len(decoder_layers) - 1}]: pruning before layer K is scored in layer K - 1)"
                )
        self.gravity_enabled = gravity
        self.gravity_directions, self.seed = gravity_directions, seed
        self._gravity: RopeGravity | None = None
        self.gravity_error: str | None = None
        self._buckets: dict[int, dict[str, _Bucket]] = {layer: {} for layer in self.layers}
        self._captures: dict[int, _Capture] = {}
        # Per layer: the mean logit scale s_h of each image (how sharp its gravity softmax was), for the file.
        self._gravity_scales: dict[int, list[float]] = {layer: [] for layer in self.layers}
        self._tap: Tap | None = None  # while attached
        self.samples = 0

    # ------------------------------------------------------------------ lifecycle

    def attach(self) -> Calibrator:
        if self._tap is not None:
            return self
        tap = Tap(self.model)
        try:
            tap.switch(self.adapter.language_model().config)  # refuses a model a Pruner is attached to
            decoder_layers = self.adapter.decoder_layers()
            for layer in self.layers:
                tap.watch(self.adapter.attention_module(decoder_layers[layer - 1]), self._callback(layer))
        except BaseException:
            tap.release()
            raise
        self._tap = tap
        return self

    def detach(self) -> None:
        if self._tap is not None:
            self._tap.release()
            self._tap = None

    def __enter__(self) -> Calibrator:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def _callback(self, layer: int) -> Callable:
        def capture(
            query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
        ) -> None:
            if query.shape[2] != key.shape[2]:  # a decoding step (with a cache), not the prefill
                return
            with torch.no_grad():
                attention = last_query_attention(query, key, mask, scaling)  # (B, L)
                norms = self.gravity_enabled and self.gravity_error is None
                self._captures[layer] = _Capture(
                    attention.float().cpu(),
                    query[:, :, -1].float().norm(dim=-1).cpu() if norms else None,  # (B, H)
                    key.float().norm(dim=-1).cpu() if norms else None,  # (B, H_kv, L)
                    float(scaling),
                    int(query.shape[-1]),
                )

        return capture

    # ------------------------------------------------------------------ measuring

    def _gravity_for(self, head_dim: int) -> RopeGravity | None:
        if not self.gravity_enabled or self.gravity_error is not None:
            return None
        if self._gravity is None:
            try:
                self._gravity = rope_gravity_for(self.adapter, head_dim, self.gravity_directions, self.seed)
            except NotImplementedError as error:
                self.gravity_error = str(error)
                return None
        return self._gravity

    @torch.no_grad()
    def update(self, inputs: Mapping[str, torch.Tensor], **generate_kwargs: Any) -> int:
        """Run one left-padded batch (processor outputs) and add it; returns the number of images measured."""
        if self._tap is None:
            raise RuntimeError("attach the Calibrator (use it as a context manager) before update()")
        input_ids = inputs["input_ids"]
        batch, length = input_ids.shape
        padding = inputs.get("attention_mask")
        padding = torch.ones_like(input_ids) if padding is None else padding
        if not bool(padding[:, -1].all()):
            raise ValueError("prompts must be left-padded (processor.tokenizer.padding_side = 'left')")
        image_inputs = {key: value for key, value in inputs.items() if key != "input_ids"}
        layout = self.adapter.visual_layout(input_ids, image_inputs)
        self._captures = {}
        self.model.generate(**inputs, max_new_tokens=1, do_sample=False, **generate_kwargs)

        real = padding.long().cpu().sum(dim=1)  # (B,) real tokens
        pad = length - real  # left padding per sample
        seq_index, image_index = layout.seq_index.cpu(), layout.image_index.cpu()
        row, col = layout.row.cpu(), layout.col.cpu()
        grid_h, grid_w = layout.grid_h.cpu(), layout.grid_w.cpu()
        in_grid = (layout.valid & layout.prunable).cpu()  # (B, N)
        measured = 0
        for layer in self.layers:
            capture = self._captures.get(layer)
            if capture is None:
                raise RuntimeError(
                    f"decoder layer {layer - 1} did not report its attention during the prefill"
                )
            gravity = self._gravity_for(capture.head_dim) if capture.query_norm is not None else None
            for b in range(batch):
                tokens = in_grid[b]
                # One group per image and grid size: the tiles of an image are measured separately.
                keys = torch.stack([image_index[b], grid_h[b], grid_w[b]], dim=1)[tokens]  # (T, 3)
                for image, h, w in torch.unique(keys, dim=0).tolist():
                    here = tokens & (image_index[b] == image) & (grid_h[b] == h) & (grid_w[b] == w)
                    index = seq_index[b][here]  # (n,) sequence positions
                    attention = capture.attention[b, index].double()  # (n,)
                    total = float(attention.sum())
                    normalised = attention / max(total, 1e-30) * index.numel()
                    bucket = self._buckets[layer].setdefault(bucket_key(h, w), _Bucket(h, w))
                    bucket.add(normalised, row[b][here], col[b][here], total)
                    measured += 1
                    if gravity is not None:
                        kv_heads = capture.key_norm.shape[1]
                        heads = capture.query_norm.shape[1]
                        key_norm = capture.key_norm[b][:, index].mean(dim=1)  # (H_kv,)
                        scale = (
                            capture.scaling
                            * capture.query_norm[b]
                            * key_norm.repeat_interleave(heads // kv_heads)
                        )  # (H,)
                        shares = gravity.attention(int(real[b]) - 1, index - pad[b], scale)  # (n,)
                        bucket.add_gravity(shares * index.numel(), row[b][here], col[b][here])
                        self._gravity_scales[layer].append(float(scale.mean()))
        self.samples += batch
        return measured // len(self.layers)

    def results(self) -> dict[int, LayerCalibration]:
        """Per pruning layer K: the buckets measured so far."""
        info = None
        if self._gravity is not None:
            language_model = self.adapter.language_model()
            rope = dict(getattr(language_model.config, "rope_parameters", None) or {})
            info = {
                "method": (
                    "softmax over the image's tokens of s_h * cos(R_m u, R_n u): identical unit query/key "
                    "direction u (no content) rotated by the model's rotary_emb at the last prompt position "
                    "m "
                    "and each image position n; averaged over heads h and random directions u; "
                    "s_h = scaling * |q_h| * mean |k_h| (post-RoPE norms measured at the scoring layer)"
                ),
                "directions": (
                    self.gravity_directions
                    if isinstance(self.gravity_directions, int)
                    else f"{len(self._gravity.directions)} given"
                ),
                "seed": self.seed,
                "rope": {key: value for key, value in rope.items() if isinstance(value, (int, float, str))},
            }

        def gravity(layer: int) -> dict[str, Any] | None:
            if info is None:
                return None
            scales = self._gravity_scales[layer]
            return {**info, "mean_logit_scale": float(f"{sum(scales) / max(len(scales), 1):.6g}")}

        return {
            layer: LayerCalibration(layer, dict(self._buckets[layer]), gravity(layer))
            for layer in self.layers
        }
