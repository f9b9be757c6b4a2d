"""LLaVA-NeXT: the adapter's token layout against the real model, and what is the family's own in the engine
on a tiny random `LlavaNextForConditionalGeneration` (anyres tiles, unpadding, newline tokens, the tile frame,
FasterVLM's per-view budgets), against independent references. What every family satisfies (both frames here)
is tests/test_contract.py.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from families import next_model
from next_reference import (
    BASE_TOKENS,
    SIDE,
    build_model,
    expected_tokens,
    image_token_id,
    prompt_inputs,
    prunable_tokens,
    sample_inputs,
)
from pipeline_fixtures import run_cli, write_vqa_parquet
from pore import Pruner, build_strategy
from pore.adapters import adapter_for
from pore.adapters.llava_next import BASE, HIGH_RES, NEWLINE, LlavaNextAdapter
from pore.testing.tiny_next import build_tiny_next_checkpoint

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

PARTS = {"base": BASE, "high": HIGH_RES, "newline": NEWLINE}
# Three samples of different image sizes (and prompt lengths): 52, 46 and 88 visual tokens.
BATCH_SIZES = [[(20, 40)], [(48, 30)], [(40, 40)]]


def generate_pre_encodes_images(model) -> bool:
    """transformers 5.23 (not 5.17): generate() encodes images first, drops pixel_values / image_sizes."""
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def layout_rows(layout, b: int) -> list[tuple[int, int, int, int, int, bool]]:
    """(image, row, col, grid_h, grid_w, prunable) of sample b's valid slots."""
    valid = layout.valid[b]
    columns = [layout.image_index, layout.row, layout.col, layout.grid_h, layout.grid_w, layout.prunable]
    return list(zip(*[c[b][valid].tolist() for c in columns], strict=True))


def expected_rows(sizes, frame: str) -> list[tuple[int, int, int, int, int, bool]]:
    return [
        (i, t.row, t.col, t.grid_h, t.grid_w, t.part != "newline")
        for i, size in enumerate(sizes)
        for t in expected_tokens(size, frame)
    ]


# ---------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    ("size", "tokens", "grid"),
    [((20, 40), 52, (4, 8)), ((48, 30), 46, (6, 4)), ((30, 45), 44, (4, 6)), ((40, 40), 88, (8, 8))],
)
def test_layout_matches_the_processor_and_the_model_features(size, tokens, grid) -> None:
    """Counts equal the processor's placeholders and the model's packed features; the newlines sit where the
    model puts `image_newline`; every high-resolution token is the feature of the tile and in-tile place
    that its whole-image position says (checked against the vision tower run tile by tile)."""
    model = next_model()
    inputs = prompt_inputs([[size]])
    expected = expected_tokens(size)
    assert len(expected) == tokens == BASE_TOKENS + grid[0] * (grid[1] + 1)
    assert int((inputs["input_ids"] == image_token_id()).sum()) == tokens
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output[0]  # (T, D)
        views = 1 + {(4, 8): 2, (6, 4): 2, (4, 6): 2, (8, 8): 4}[grid]
        tower = model.model.vision_tower(inputs["pixel_values"][0, :views], output_hidden_states=True)
        per_view = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])  # (V, 16, D) no CLS
    assert features.shape[0] == tokens
    is_newline = (features == model.model.image_newline).all(dim=-1)
    assert is_newline.tolist() == [t.part == "newline" for t in expected]
    for n, token in enumerate(expected):
        if token.part != "newline":
            torch.testing.assert_close(features[n], per_view[token.view, token.in_view], atol=1e-6, rtol=0)

    adapter = adapter_for(model)
    assert isinstance(adapter, LlavaNextAdapter)
    image = adapter.image_tokens(*size)
    assert image.part.tolist() == [PARTS[t.part] for t in expected]
    assert (image.row.tolist(), image.col.tolist()) == ([t.row for t in expected], [t.col for t in expected])
    assert image.grid_h.tolist() == [t.grid_h for t in expected]
    assert image.grid_w.tolist() == [t.grid_w for t in expected]
    assert image.prunable.tolist() == [t.part != "newline" for t in expected]


def test_high_resolution_rows_span_the_whole_image_and_tiles_are_a_frame() -> None:
    """Hand-checked positions of the 48 x 30 image: 2 x 1 tiles, one feature row cropped at top and bottom."""
    model = next_model()
    whole, tile = LlavaNextAdapter(model), LlavaNextAdapter(model, position_frame="tile")
    high = slice(BASE_TOKENS, None)
    # Whole image: 6 rows x 4 cols, each followed by its newline (which repeats the row's last position).
    assert whole.image_tokens(48, 30).row[high].tolist() == [r for r in range(6) for _ in range(5)]
    assert whole.image_tokens(48, 30).col[high].tolist() == [0, 1, 2, 3, 3] * 6
    assert set(whole.image_tokens(48, 30).grid_h[high].tolist()) == {6}
    # Tiles: rows 1-3 of the top tile, then rows 0-2 of the bottom one, in a 4 x 4 grid each.
    assert tile.image_tokens(48, 30).row[high].tolist() == [r for r in (1, 2, 3, 0, 1, 2) for _ in range(5)]
    assert set(tile.image_tokens(48, 30).grid_h.tolist()) == {SIDE}
    # The base view is the same in both frames.
    assert (
        whole.image_tokens(48, 30).row[:BASE_TOKENS].tolist()
        == tile.image_tokens(48, 30).row[:BASE_TOKENS].tolist()
    )
    with pytest.raises(ValueError, match="position_frame"):
        LlavaNextAdapter(model, position_frame="sequence")


@pytest.mark.parametrize("frame", ["image", "tile"])
def test_batch_layout_with_padding_and_several_images(frame: str) -> None:
    model = next_model()
    adapter = LlavaNextAdapter(model, position_frame=frame)
    samples = [[(20, 40), (48, 30)], [(30, 45)], [(40, 40)]]
    inputs = prompt_inputs(samples)
    layout = adapter.visual_layout(inputs["input_ids"], {"image_sizes": inputs["image_sizes"]})
    for b, sizes in enumerate(samples):
        assert layout_rows(layout, b) == expected_rows(sizes, frame)
        positions = (inputs["input_ids"][b] == image_token_id()).nonzero().flatten()
        assert layout.seq_index[b][layout.valid[b]].tolist() == positions.tolist()
    assert layout.valid.sum(dim=1).tolist() == [52 + 46, 44, 88]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_from_pre_encoded_images_equals_layout_from_sizes(dtype: torch.dtype) -> None:
    """transformers 5.23 (not 5.17): generate() gives the forward `mm_encoder_outputs`, no `image_sizes`."""
    model = build_model().to(dtype)
    adapter = adapter_for(model)
    inputs = prompt_inputs([[(20, 40), (48, 30)], [(30, 45)]])
    with torch.no_grad():
        encoded = model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(dtype), image_sizes=inputs["image_sizes"], return_dict=True
        )
    from_sizes = adapter.visual_layout(inputs["input_ids"], {"image_sizes": inputs["image_sizes"]})
    from_features = adapter.visual_layout(inputs["input_ids"], {"mm_encoder_outputs": {"image": encoded}})
    for name in ("seq_index", "image_index", "row", "col", "grid_h", "grid_w", "valid", "prunable"):
        assert torch.equal(getattr(from_sizes, name), getattr(from_features, name)), name
    with pytest.raises(ValueError, match="position_frame='tile' needs image_sizes"):
        LlavaNextAdapter(model, "tile").visual_layout(
            inputs["input_ids"], {"mm_encoder_outputs": {"image": encoded}}
        )


def test_layout_errors_say_what_to_pass() -> None:
    model = next_model()
    adapter = adapter_for(model)
    inputs = prompt_inputs([[(20, 40)]])
    with pytest.raises(ValueError, match="needs image_sizes"):
        adapter.visual_layout(inputs["input_ids"], {})
    with pytest.raises(ValueError, match="LlavaNextProcessor"):
        adapter.visual_layout(inputs["input_ids"], {"image_sizes": torch.tensor([[48, 30]])})
    with pytest.raises(ValueError, match="LlavaNextProcessor"):
        adapter.visual_layout(inputs["input_ids"], {"image_sizes": torch.tensor([[20, 40], [20, 40]])})
    # No image tokens: an empty layout, no sizes needed.
    empty = adapter.visual_layout(torch.tensor([[1, 5, 6]]), {})
    assert empty.seq_index.shape == (1, 0)


# ---------------------------------------------------------------------------------------------- engine


def test_prior_moves_the_choice_towards_the_top_of_the_image() -> None:
    model = next_model()
    inputs = sample_inputs(prompt_inputs([[(40, 40)]]), 0, 0, 1)
    high = prunable_tokens((40, 40))
    mean_rows = {}
    for alpha in (0.0, 0.99):
        strategy = build_strategy("pore_linear", keep=12, prior={"alpha": alpha})
        with torch.no_grad(), Pruner(model, strategy) as pruner:
            model(**inputs)
        rows = [high[i].row / (high[i].grid_h - 1) for i in pruner.last_record.kept_raster[0][0]]
        mean_rows[alpha] = sum(rows) / len(rows)
    assert mean_rows[0.99] < mean_rows[0.0]


def test_tile_frame_needs_the_image_sizes_when_generate_encodes_the_images() -> None:
    """transformers >= 5.23: generate() keeps image_sizes from the forward, so without the sizes the tile
    frame refuses; with set_image_sizes (what the pipeline does for every batch) it works
    (tests/test_contract.py runs the tile frame's generation that way)."""
    model = next_model()
    sizes = [(48, 30)]
    alone = sample_inputs(prompt_inputs([sizes]), 0, 0, 1)
    strategy = build_strategy("pore_exponential", keep=5, layer=2)
    with torch.no_grad(), Pruner(model, strategy, "llava_next_tile") as pruner:
        if generate_pre_encodes_images(model):
            with pytest.raises(ValueError, match="position_frame='tile' needs image_sizes"):
                model.generate(**alone, max_new_tokens=2, do_sample=False)
        pruner.set_image_sizes([sizes])
        model.generate(**alone, max_new_tokens=2, do_sample=False)
    layout = pruner.last_record.layout
    assert set(layout.grid_h[layout.valid].tolist()) == {SIDE}


def test_tile_frame_by_name() -> None:
    """`adapter="llava_next_tile"` (the config's `model.adapter`) picks the tile frame; auto-detection the
    whole-image one."""
    model = next_model()
    inputs = prompt_inputs([[(48, 30)]])
    with torch.no_grad(), Pruner(model, build_strategy("pore_linear", keep=4), "llava_next_tile") as pruner:
        model(**inputs)
    layout = pruner.last_record.layout
    assert set(layout.grid_h[layout.valid].tolist()) == {SIDE}
    assert adapter_for(model).position_frame == "image"


# ---------------------------------------------------------------------------------------------- pipeline


def test_cli_run_on_a_tiny_llava_next_checkpoint(tmp_path: Path) -> None:
    """`python src/run.py model.path=<tiny LLaVA-NeXT>` end to end: AutoProcessor / AutoModel load it, the
    collator's `image_sizes` reach generate(), and the rows count the newlines as kept visual tokens."""
    checkpoint = build_tiny_next_checkpoint(tmp_path / "tiny-next")
    data = write_vqa_parquet(tmp_path / "vqa", samples=6)
    out = tmp_path / "run"
    result = run_cli(
        f"model.path={checkpoint}",
        "model.name=tiny_next",
        "data=vqav2",
        f"data.path={data}",
        "data.config=null",
        "data.split=test",
        "data.batch_size=4",
        "data.num_workers=0",
        f"output_dir={out}",
        "strategy=pore_linear",
        "strategy.keep=null",
        "strategy.ratio=0.25",
        "logger=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["error"] is None for row in rows)
    # The parquet images are 40 x 56 (h x w): 64 x 64 canvas, 8 x 8 features cropped to 6 x 8 rows.
    for row in rows:
        assert row["n_visual_tokens_before"] == 16 + 6 * (8 + 1)
        assert len(row["kept_visual_indices"]) == round(0.25 * (16 + 6 * 8))
        assert row["n_visual_tokens"] == len(row["kept_visual_indices"]) + 6  # + the newlines


# ---------------------------------------------------------------------------------------------- other methods


def test_pool_keeps_window_centres_of_both_grids_when_they_have_the_same_shape() -> None:
    model = next_model()
    # 10 x 10: every pinpoint shows all 100 px, the 32 x 64 canvas wastes least; unpadded to 4 x 4.
    assert set(LlavaNextAdapter(model).image_tokens(10, 10).grid_h.tolist()) == {SIDE}
    inputs = prompt_inputs([[(10, 10)]])
    with torch.no_grad(), Pruner(model, build_strategy("pool", keep=None, ratio=0.25)) as pruner:
        model(**inputs)
    # 4 of each grid's 16 tokens: the centres of its 2 x 2 windows (raster 0, 2, 8, 10).
    assert pruner.last_record.kept_raster == [[[0, 2, 8, 10, 16, 18, 24, 26]]]


def test_padding_suppression_is_refused() -> None:
    """LLaVA-NeXT never pads to a square: the LLaVA-1.5 border rule would drop real content."""
    with pytest.raises(ValueError, match="do not pad images to a square"):
        Pruner(next_model(), build_strategy("pore_linear", prior={"suppress_padding": True}))


def round_robin_quotas(budget: int, sizes: list[int]) -> list[int]:
    """One token at a time to each view in turn (skipping full ones): the equal split of the budget."""
    quotas = [0] * len(sizes)
    while budget > 0 and any(q < s for q, s in zip(quotas, sizes, strict=True)):
        for v in range(len(sizes)):
            if budget > 0 and quotas[v] < sizes[v]:
                quotas[v] += 1
                budget -= 1
    return quotas


@pytest.mark.parametrize("budget", ["per_view", "joint"])
def test_fastervlm_ranks_each_token_by_the_cls_attention_of_its_own_view(budget: str) -> None:
    """Base tokens by the base view's [CLS] row, high-resolution tokens by their tile's (eager CLIP
    attention of the feature layer); newlines are never dropped. per_view (official): the budget is split
    equally between the base view and the tiles, each keeping its top tokens; joint: one top-k per image.
    Batched and alone agree."""
    model = build_model()
    inputs = prompt_inputs([[(48, 30)], [(30, 45)]])
    keep = 6
    strategy = build_strategy("fastervlm", keep=keep, layer=2, options={"budget": budget})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        model(**inputs)
    kept = pruner.last_record.kept_raster
    adapter = LlavaNextAdapter(model)
    model.set_attn_implementation({"vision_config": "eager"})
    encoder_layers = len(model.model.vision_tower.encoder.layers)
    scoring_layer = encoder_layers + model.config.vision_feature_layer  # hidden_states[-2]: layer L - 2
    for b, (height, width) in enumerate(inputs["image_sizes"].tolist()):
        coordinates = adapter._packed_coordinates(height, width, "default")  # (T, 4): part, tile, row, col
        views = int(coordinates[:, 1].max()) + 2  # base + tiles
        with torch.no_grad():
            out = model.model.vision_tower(inputs["pixel_values"][b, :views], output_attentions=True)
        cls_rows = out.attentions[scoring_layer][:, :, 0, 1:].mean(dim=1)  # (views, S * S)
        tokens = [(tile + 1, row, col) for part, tile, row, col in coordinates.tolist() if part != NEWLINE]
        scores = [float(cls_rows[view, row * SIDE + col]) for view, row, col in tokens]
        if budget == "joint":
            expected = sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])
        else:
            views = sorted({view for view, _, _ in tokens})
            members = [[i for i, token in enumerate(tokens) if token[0] == v] for v in views]
            quotas = round_robin_quotas(keep, [len(m) for m in members])
            expected = sorted(
                i
                for m, quota in zip(members, quotas, strict=True)
                for i in sorted(m, key=lambda i: (-scores[i], i))[:quota]
            )
            assert len(views) > 2 and len(expected) == keep  # several tiles share the budget
        assert kept[b] == [expected]
    model.set_attn_implementation({"vision_config": "sdpa"})
    with torch.no_grad(), Pruner(model, strategy.replace(layer=0)) as pruner:
        model(**{key: value[1:] for key, value in inputs.items()})
    assert pruner.last_record.kept_raster[0] == kept[1]


@pytest.mark.parametrize("budget", ["per_view", "joint"])
def test_fastervlm_padded_batch_equals_single_samples(budget: str) -> None:
    """Per-view budgets with compact positions (official FasterVLM, before the LLM): a padded batch of
    images of different sizes generates what each sample generates alone."""
    model = next_model()
    inputs = prompt_inputs(BATCH_SIZES)
    prompt_length = inputs["input_ids"].shape[1]
    strategy = build_strategy("fastervlm", keep=None, ratio=0.5, options={"budget": budget})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        pruner.set_image_sizes(BATCH_SIZES)
        batch_out = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, prompt_length:]
        batch_kept = pruner.last_record.kept_raster
        for b in range(len(BATCH_SIZES)):
            alone = sample_inputs(inputs, b, b, 1)
            pruner.set_image_sizes([BATCH_SIZES[b]])
            out = model.generate(**alone, max_new_tokens=5, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert pruner.last_record.kept_raster == [batch_kept[b]]
            assert out[0].tolist() == batch_out[b].tolist()
