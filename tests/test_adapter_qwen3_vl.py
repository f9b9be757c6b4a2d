"""The pruning engine inside tiny random Qwen3-VL and Qwen3-VL-MoE models (real transformers classes, built
offline from configs): the token layout against the processor's placeholders and grids, DeepStack features
carried for the kept tokens only (pruning before, inside and after the DeepStack layers, against a by-hand
forward), and `python src/run.py` end to end on a saved tiny checkpoint with every method. What every family
satisfies (keeping everything, the kept set, padded batches, cached generation, every method x prior) is
tests/test_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from families import FAMILIES as CONTRACT_FAMILIES
from pipeline_fixtures import run_program, write_vqa_parquet
from pore import Pruner, build_strategy
from pore.adapters import adapter_for
from pore.adapters.qwen3_vl import Qwen3VLAdapter
from pore.testing.tiny_llava import save_checkpoint
from pore.testing.tiny_qwen3_vl import ImageOnlyQwen3VLProcessor, build_tiny_qwen3_vl
from qwen3_reference import (
    FAMILIES,
    SAMPLES,
    VIDEO_SAMPLES,
    make_inputs,
    processor,
    prunable,
    reference_pruned_logits,
    sample_inputs,
    tiny_model,
    video_inputs,
)
from qwen_reference import kept_positions

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

KEEP = 3  # per image; the smallest test image has 4 x 2 = 8 tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_is_detected_for_the_dense_and_the_moe_class(family: str) -> None:
    model = tiny_model(family)
    assert isinstance(adapter_for(model), Qwen3VLAdapter)
    assert isinstance(adapter_for(model.model), Qwen3VLAdapter)  # the bare Qwen3VLModel / Qwen3VLMoeModel
    assert family in CONTRACT_FAMILIES  # the engine's contract runs on it


def test_layout_matches_the_processors_placeholders_and_grids() -> None:
    """Each sample's visual tokens are exactly its `<|image_pad|>` placeholders, image after image, each image
    an (h / 2) x (w / 2) raster of its `image_grid_thw` (read here by hand)."""
    model = tiny_model("qwen3_vl")
    inputs = make_inputs()
    layout = adapter_for(model).visual_layout(inputs["input_ids"], inputs)
    grids = inputs["image_grid_thw"].tolist()
    image = 0
    for b, (_, sizes) in enumerate(SAMPLES):
        placeholders = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        valid = layout.valid[b]
        assert layout.seq_index[b][valid].tolist() == placeholders.tolist()
        rows, cols, images = [], [], []
        for i in range(len(sizes)):
            _, h, w = grids[image]
            image += 1
            h, w = h // 2, w // 2
            rows += [r for r in range(h) for _ in range(w)]
            cols += [c for _ in range(h) for c in range(w)]
            images += [i] * (h * w)
        assert layout.row[b][valid].tolist() == rows
        assert layout.col[b][valid].tolist() == cols
        assert layout.image_index[b][valid].tolist() == images
        assert [n for n in prunable(b)] == [images.count(i) for i in range(len(sizes))]
        assert bool(layout.prunable[b][valid].all())


def test_layout_from_m_rope_positions_equals_layout_from_the_grid() -> None:
    """transformers >= 5.23's generate() hands the forward the 3-D positions (from the model's own
    `get_rope_index`) instead of image_grid_thw: the layout read off them is the same."""
    model = tiny_model("qwen3_vl")
    inputs = make_inputs()
    adapter = adapter_for(model)
    by_grid = adapter.visual_layout(inputs["input_ids"], {"image_grid_thw": inputs["image_grid_thw"]})
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # (3, B, L)
    by_positions = adapter.visual_layout(inputs["input_ids"], {"position_ids": positions})
    for field in ("seq_index", "image_index", "row", "col", "grid_h", "grid_w", "valid", "prunable"):
        assert torch.equal(getattr(by_positions, field), getattr(by_grid, field)), field


def test_compact_positions_are_refused_for_the_interleaved_m_rope() -> None:
    """Interleaved 3-D M-RoPE positions cannot be renumbered: positions=compact says so before any forward."""
    with pytest.raises(ValueError, match="3-D M-RoPE positions that cannot be compacted"):
        Pruner(tiny_model("qwen3_vl"), build_strategy("fastv", keep=KEEP, positions="compact"))


# ---------------------------------------------------------------------------------------------- DeepStack


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("strategy", "layer"),
    [("random", 0), ("random", 1), ("fastv", 1), ("pore_linear", 3)],
)
def test_pruning_before_inside_or_after_the_deepstack_layers_equals_the_hand_reference(
    family: str, strategy: str, layer: int
) -> None:
    """DeepStack adds features after decoder layers 0, 1 and 2: pruning before layer 0, 1 (features of
    layers 1 and 2 go to the kept tokens only) or 3 (all of them added before pruning) equals removing the
    dropped tokens and their DeepStack features by hand; without the DeepStack features the reference differs
    (so the comparison sees them)."""
    model = tiny_model(family)
    for b in range(len(SAMPLES)):
        inputs = sample_inputs(b)
        settings = build_strategy(strategy, keep=KEEP, layer=layer)
        with torch.no_grad(), Pruner(model, settings) as pruner:
            pruned = model(**inputs).logits
        kept = kept_positions(inputs, model.config.image_token_id, pruner.last_record.kept_raster[0])
        assert pruned.shape[1] == len(kept) < inputs["input_ids"].shape[1]
        expected = reference_pruned_logits(model, inputs, layer, kept)
        torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
        without = reference_pruned_logits(model, inputs, layer, kept, with_deepstack=False)
        assert (pruned - without).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 1])
def test_a_padded_batch_pruned_before_the_deepstack_layers_equals_each_sample_alone(layer: int) -> None:
    """DeepStack rows are batch-major over the padded batch's image tokens: pruning before layer 0 or 1 (the
    samples keep different numbers of tokens) gives each sample's last logits as it has alone."""
    model = tiny_model("qwen3_vl")
    inputs = make_inputs()
    settings = build_strategy("random" if layer == 0 else "fastv", keep=None, ratio=0.3, layer=layer)
    with torch.no_grad(), Pruner(model, settings) as pruner:
        batch = model(**inputs).logits[:, -1]  # (B, V)
        batch_kept = pruner.last_record.kept_raster
        for b in range(len(SAMPLES)):
            alone = model(**sample_inputs(b)).logits[:, -1]
            assert pruner.last_record.kept_raster == [batch_kept[b]]
            torch.testing.assert_close(batch[b : b + 1], alone, atol=1e-4, rtol=0)


def test_keeping_everything_adds_the_deepstack_features_as_the_model_does() -> None:
    """Keep-all in a padded batch (DeepStack rows are batch-major across samples) equals the untouched
    model."""
    model = tiny_model("qwen3_vl")
    inputs = make_inputs()
    with torch.no_grad():
        plain = model(**inputs).logits
        with Pruner(model, build_strategy("fastv", keep=None, ratio=1.0, layer=1)):
            kept_all = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(kept_all[real], plain[real], atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------- video


def video_reference_kept(family: str, inputs: dict, spans: list[list[int]], layer: int, keep: int):
    """FastV's choice per item (a video is one item) for one unpadded sample, from eager attention: the
    top-`keep` of the last prompt token's attention in layer `layer - 1` (mean over heads), earlier token
    first on ties; as sorted indices inside each item, frame after frame."""
    with torch.no_grad():
        attention = tiny_model(family, "eager")(**inputs, output_attentions=True).attentions[layer - 1]
    last = attention[0, :, -1].mean(dim=0)  # (L,)
    return [sorted(sorted(range(len(s)), key=lambda i, s=s: (-float(last[s[i]]), i))[:keep]) for s in spans]


def test_video_layout_is_frame_row_col_with_one_item_per_video() -> None:
    """Frames are runs of their own (timestamps between them): the layout still makes each video one item,
    in prompt order with the images, with (frame, row, col) counted inside each frame; generate()'s way of
    calling the forward in transformers >= 5.23 (M-RoPE positions and the encoder's outputs, no grids) gives
    the same layout, and positions alone are refused (frames cannot be put back into videos)."""
    model = tiny_model("qwen3_vl")
    inputs, spans = video_inputs()
    adapter = adapter_for(model)
    layout = adapter.visual_layout(inputs["input_ids"], inputs)
    # sample 0: a video of 2 frames of 2 x 3 tokens, then a 2 x 2 image
    valid = layout.valid[0]
    assert layout.seq_index[0][valid].tolist() == spans[0][0] + spans[0][1]
    assert layout.image_index[0][valid].tolist() == [0] * 12 + [1] * 4
    assert layout.frame[0][valid].tolist() == [0] * 6 + [1] * 6 + [0] * 4
    assert layout.row[0][valid].tolist() == [0, 0, 0, 1, 1, 1] * 2 + [0, 0, 1, 1]
    assert layout.col[0][valid].tolist() == [0, 1, 2] * 4 + [0, 1] * 2
    # sample 1: a 2 x 4 image, then a video of 3 frames of 2 x 2
    valid = layout.valid[1]
    assert layout.seq_index[1][valid].tolist() == spans[1][0] + spans[1][1]
    assert layout.image_index[1][valid].tolist() == [0] * 8 + [1] * 12
    assert layout.frame[1][valid].tolist() == [0] * 8 + [0] * 4 + [1] * 4 + [2] * 4
    assert layout.grid_w[1][valid].tolist() == [4] * 8 + [2] * 12
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # (3, B, L)
    with torch.no_grad():
        encoded = model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
        )
    by_positions = adapter.visual_layout(
        inputs["input_ids"], {"position_ids": positions, "mm_encoder_outputs": {"video": encoded}}
    )
    for field in ("seq_index", "image_index", "row", "col", "grid_h", "grid_w", "frame", "valid"):
        assert torch.equal(getattr(by_positions, field), getattr(layout, field)), field
    with pytest.raises(ValueError, match="needs video_grid_thw \\(or the video encoder's outputs\\)"):
        adapter.visual_layout(inputs["input_ids"], {"position_ids": positions})


@pytest.mark.parametrize("family", FAMILIES)
def test_video_tokens_are_pruned_with_one_budget_per_video_as_the_references(family: str) -> None:
    """FastV keeps its top-3 of each video (all frames together) and of each image, as the eager reference;
    the pruned forward equals removing the dropped tokens and their DeepStack features by hand (and differs
    without the DeepStack features, so the video tokens' features are seen); generate() keeps the same."""
    model = tiny_model(family)
    for b in range(len(VIDEO_SAMPLES)):
        inputs, spans = video_inputs([b])
        unpadded = {key: value for key, value in inputs.items() if key != "attention_mask"}
        with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=KEEP, layer=2)) as pruner:
            pruned = model(**unpadded).logits
            kept = pruner.last_record.kept_raster
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert (
                pruner.last_record.kept_raster == kept
            )  # generate()'s prefill placed the video the same way
        assert kept == [video_reference_kept(family, unpadded, spans[0], 2, KEEP)]
        dropped = {
            s[i]
            for s, chosen in zip(spans[0], kept[0], strict=True)
            for i in set(range(len(s))) - set(chosen)
        }
        positions = torch.tensor([p for p in range(inputs["input_ids"].shape[1]) if p not in dropped])
        torch.testing.assert_close(
            pruned, reference_pruned_logits(model, unpadded, 2, positions), atol=1e-5, rtol=0
        )
        without = reference_pruned_logits(model, unpadded, 2, positions, with_deepstack=False)
        assert (pruned - without).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_video_pruned_before_inside_or_after_deepstack_equals_the_hand_reference(layer: int) -> None:
    """Random pruning before decoder layer 0 / 1 (video tokens dropped before some DeepStack additions) or 3
    (after all of them) equals the hand reference for prompts with videos and images."""
    model = tiny_model("qwen3_vl")
    for b in range(len(VIDEO_SAMPLES)):
        inputs, spans = video_inputs([b])
        inputs.pop("attention_mask")
        with torch.no_grad(), Pruner(model, build_strategy("random", keep=KEEP, layer=layer)) as pruner:
            pruned = model(**inputs).logits
        chosen = pruner.last_record.kept_raster[0]
        kept = {s[i] for s, items in zip(spans[0], chosen, strict=True) for i in items}
        every = {p for s in spans[0] for p in s}
        positions = torch.tensor(
            [p for p in range(inputs["input_ids"].shape[1]) if p not in every or p in kept]
        )
        torch.testing.assert_close(
            pruned, reference_pruned_logits(model, inputs, layer, positions), atol=1e-5, rtol=0
        )


def test_a_padded_batch_with_videos_equals_each_sample_alone_and_keep_all_equals_untouched() -> None:
    """Two prompts of different lengths (a video then an image; an image then a longer video): keeping
    everything equals the untouched model; pruning (different token counts per sample) gives each sample's
    last logits and kept set as it has alone."""
    model = tiny_model("qwen3_vl")
    inputs, _ = video_inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**inputs).logits
        with Pruner(model, build_strategy("fastv", keep=None, ratio=1.0, layer=1)):
            torch.testing.assert_close(model(**inputs).logits[real], plain[real], atol=1e-5, rtol=0)
        with Pruner(model, build_strategy("fastv", keep=None, ratio=0.4, layer=1)) as pruner:
            batch = model(**inputs).logits[:, -1]  # (B, V)
            batch_kept = pruner.last_record.kept_raster
            for b in range(len(VIDEO_SAMPLES)):
                alone, _ = video_inputs([b])
                assert torch.equal(alone["input_ids"][0], inputs["input_ids"][b][real[b]])
                last = model(**alone).logits[:, -1]
                assert pruner.last_record.kept_raster == [batch_kept[b]]
                torch.testing.assert_close(batch[b : b + 1], last, atol=1e-4, rtol=0)


def test_budget_per_frame_keeps_the_budget_in_every_frame_and_carries_deepstack() -> None:
    """model.adapter=qwen3_vl_frames: every frame of a video is an item with its own top-2 (the eager
    reference within the frame), DeepStack included (the by-hand forward)."""
    model = tiny_model("qwen3_vl")
    inputs, spans = video_inputs([0])
    inputs.pop("attention_mask")
    video, image = spans[0]
    frames = [video[:6], video[6:], image]
    with (
        torch.no_grad(),
        Pruner(model, build_strategy("fastv", keep=2, layer=2), "qwen3_vl_frames") as pruner,
    ):
        pruned = model(**inputs).logits
    assert pruner.last_record.kept_raster == [video_reference_kept("qwen3_vl", inputs, frames, 2, 2)]
    kept = {s[i] for s, items in zip(frames, pruner.last_record.kept_raster[0], strict=True) for i in items}
    positions = torch.tensor(
        [p for p in range(inputs["input_ids"].shape[1]) if p not in set(video + image) or p in kept]
    )
    torch.testing.assert_close(
        pruned, reference_pruned_logits(model, inputs, 2, positions), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------------------------ run.py end to end

# What `python src/run.py model=qwen3_vl_2b model.path=<tiny> strategy=<s>` does with each method: every
# method but FasterVLM (the vision tower has no [CLS] token) runs.
# SparseVLM's stages (after layers 2 / 6 / 15, 300 / 200 / 110 tokens) are scaled to the tiny model.
RUNS = {
    "none": [],
    "fastv": [],
    "pore_linear": [],
    "pore_exponential": [],
    "random": [],
    "pool": [],
    "pdrop": [],
    "sparsevlm": ["strategy.layer=[1,2,3]", "strategy.keep=[6,4,2]"],
    "dart": [],
    "divprune": [],
    "himap": [],
    "tokencarve": [],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-VL checkpoint whose processor is the image-only subclass of `Qwen3VLProcessor` (no
    torchvision here), registered with `AutoProcessor` so that `from_pretrained` finds it by the class name
    the folder records (with torchvision, `build_tiny_qwen3_vl_checkpoint` saves the real class)."""
    from transformers import AutoProcessor, Qwen3VLConfig

    AutoProcessor.register(Qwen3VLConfig, ImageOnlyQwen3VLProcessor, exist_ok=True)
    images_only = processor()
    model = build_tiny_qwen3_vl(len(images_only.tokenizer))
    path = save_checkpoint(model, images_only, tmp_path_factory.mktemp("model") / "tiny-qwen3-vl")
    if not isinstance(AutoProcessor.from_pretrained(path), ImageOnlyQwen3VLProcessor):
        # transformers 5.17's AutoProcessor does not look the saved class name up among registered ones.
        pytest.skip("AutoProcessor here does not load a processor class registered at run time")
    return path


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vqa_parquet(tmp_path_factory.mktemp("data") / "vqa", samples=3)


def run(checkpoint: Path, benchmark: Path, out: Path, strategy: str, *extra: str):
    return run_program(
        "model=qwen3_vl_2b",
        f"model.path={checkpoint}",
        "model.processor.min_pixels=1024",
        "model.processor.max_pixels=16384",
        "data=vqav2",
        f"data.path={benchmark}",
        "data.config=null",
        "data.split=test",
        "data.batch_size=2",
        "data.num_workers=0",
        "logger=none",
        f"output_dir={out}",
        f"strategy={strategy}",
        *extra,
    )


@pytest.mark.parametrize("strategy", sorted(RUNS))
def test_run_py_end_to_end_with_each_method(
    checkpoint: Path, benchmark: Path, tmp_path: Path, strategy: str
) -> None:
    result = run(checkpoint, benchmark, tmp_path / strategy, strategy, *RUNS[strategy])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / strategy / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and '"error": null' in rows[0]


def test_run_py_refuses_fastervlm(checkpoint: Path, benchmark: Path, tmp_path: Path) -> None:
    """Refused in one line (exit 2) when the strategy is resolved against the family: before the weights."""
    result = run(checkpoint, benchmark, tmp_path / "fastervlm", "fastervlm")
    assert result.returncode == 2  # one line, before the weights load
    assert "fastervlm scores with the vision tower's [CLS] attention" in result.stderr
    assert "qwen3_vl models do not give" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("config", ["qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_30b_a3b"])
def test_real_checkpoints_compose_and_are_refused_offline_in_one_line(config: str, tmp_path: Path) -> None:
    result = run_program(f"model={config}", "data=vqav2", f"output_dir={tmp_path}", "logger=none")
    assert result.returncode == 2
    assert "is a hub id that is not in the local cache" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
