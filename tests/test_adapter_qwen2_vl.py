"""The pruning engine inside tiny random Qwen2-VL and Qwen2.5-VL models (real transformers classes, built
offline from configs), against independent references: dynamic grids from image_grid_thw, several images per
prompt, images of different sizes in one batch, 3-D M-RoPE positions and rope_deltas at decoding. What every
family satisfies (keeping everything, the kept set, padded batches, cached generation, every method x prior)
is tests/test_contract.py; here is what is Qwen's own."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pore import Pruner, build_strategy
from pore.adapters import adapter_for
from pore.adapters.qwen2_vl import Qwen2VLAdapter
from pore.data.benchmark import Sample
from pore.data.collate import PromptCollator
from qwen_reference import (
    FAMILIES,
    PIXELS_PER_TOKEN,
    SAMPLES,
    image,
    make_inputs,
    processor,
    sample_inputs,
    tiny_model,
    until_eos,
    video_inputs,
)

pytestmark = pytest.mark.parametrize("family", FAMILIES)

KEEP = 3  # per image; the smallest test image has 4 x 2 = 8 tokens


def image_token_id(family: str) -> int:
    return tiny_model(family).config.image_token_id


# ---------------------------------------------------------------------------------------------------- layout


def test_adapter_is_detected_for_both_classes(family: str) -> None:
    model = tiny_model(family)
    assert isinstance(adapter_for(model), Qwen2VLAdapter)
    assert isinstance(adapter_for(model.model), Qwen2VLAdapter)  # the bare Qwen2VLModel / Qwen2_5_VLModel
    adapter = adapter_for(model)
    assert adapter.language_model() is model.model.language_model
    assert len(adapter.decoder_layers()) == 4


def test_layout_of_two_images_of_different_sizes_and_a_batch(family: str) -> None:
    inputs = make_inputs(family, SAMPLES)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 10], [1, 8, 4], [1, 10, 6]]
    adapter = adapter_for(tiny_model(family))
    layout = adapter.visual_layout(inputs["input_ids"], {"image_grid_thw": inputs["image_grid_thw"]})
    # Written out by hand: (grid h, grid w) in tokens for each image of each sample.
    grids = [[(4, 4)], [(3, 5), (4, 2)], [(5, 3)]]
    ids = inputs["input_ids"]
    for b, sample_grids in enumerate(grids):
        expected = {key: [] for key in ("image", "row", "col", "h", "w")}
        for i, (h, w) in enumerate(sample_grids):
            for r in range(h):
                for c in range(w):
                    for key, value in zip(expected, (i, r, c, h, w), strict=True):
                        expected[key].append(value)
        n = len(expected["row"])
        assert int(layout.valid[b].sum()) == n
        assert not bool(layout.valid[b, n:].any())
        assert (
            layout.seq_index[b, :n].tolist()
            == (ids[b] == image_token_id(family)).nonzero().flatten().tolist()
        )
        assert layout.image_index[b, :n].tolist() == expected["image"]
        assert layout.row[b, :n].tolist() == expected["row"]
        assert layout.col[b, :n].tolist() == expected["col"]
        assert layout.grid_h[b, :n].tolist() == expected["h"]
        assert layout.grid_w[b, :n].tolist() == expected["w"]
        assert bool(layout.prunable[b, :n].all())
    assert layout.images_per_sample.tolist() == [1, 2, 1]
    # The raster index is the token's rank inside its image (grid tokens are in raster order).
    assert layout.raster[1, 15:23].tolist() == list(range(8))


def test_layout_from_m_rope_positions_equals_layout_from_the_grid(family: str) -> None:
    """transformers >= 5.23's generate() hands the forward 3-D positions instead of image_grid_thw."""
    model = tiny_model(family)
    inputs = make_inputs(family, SAMPLES)
    adapter = adapter_for(model)
    by_grid = adapter.visual_layout(inputs["input_ids"], {"image_grid_thw": inputs["image_grid_thw"]})
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # (3, B, L)
    text_positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)[None]  # generate's 4th row
    for position_ids in (positions, torch.cat([text_positions, positions])):
        by_positions = adapter.visual_layout(inputs["input_ids"], {"position_ids": position_ids})
        for field in ("seq_index", "image_index", "row", "col", "grid_h", "grid_w", "valid", "prunable"):
            assert torch.equal(getattr(by_positions, field), getattr(by_grid, field)), field


def test_layout_errors_say_what_is_missing(family: str) -> None:
    inputs = make_inputs(family, SAMPLES[:2])
    adapter = adapter_for(tiny_model(family))
    with pytest.raises(ValueError, match="image_grid_thw"):
        adapter.visual_layout(inputs["input_ids"])
    with pytest.raises(ValueError, match="not whole images"):
        # The two samples' grids swapped: counts no longer fall on image boundaries.
        adapter.visual_layout(inputs["input_ids"], {"image_grid_thw": inputs["image_grid_thw"].flip(0)})
    with pytest.raises(ValueError, match="not whole images"):
        adapter.visual_layout(inputs["input_ids"], {"image_grid_thw": inputs["image_grid_thw"][:0]})
    # A prompt without image tokens has an empty layout and needs no grid.
    text_only = processor(family)(text=["what colour is it?"], return_tensors="pt")["input_ids"]
    assert adapter.visual_layout(text_only).valid.shape == (1, 0)


def test_images_of_other_sizes_give_other_grids(family: str) -> None:
    sizes = [(28, 28), (28, 112), (112, 56), (98, 84)]
    inputs = dict(
        processor(family)(
            images=[[image(size, seed=i)] for i, size in enumerate(sizes)],
            text=[
                processor(family).apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            ]
            * len(sizes),
            padding=True,
            return_tensors="pt",
        )
    )
    layout = adapter_for(tiny_model(family)).visual_layout(inputs["input_ids"], inputs)
    grids = [(h // PIXELS_PER_TOKEN, w // PIXELS_PER_TOKEN) for h, w in sizes]
    assert [(int(layout.grid_h[b, 0]), int(layout.grid_w[b, 0])) for b in range(len(sizes))] == grids
    assert layout.valid.sum(dim=1).tolist() == [h * w for h, w in grids]


def test_an_image_of_several_frames_is_one_image_with_rows_per_frame(family: str) -> None:
    """t > 1 (not produced by the image processor, which gives t = 1): frame after frame, row / col inside
    each frame, one image_index (one budget) for all frames; the M-RoPE positions say the same."""
    model = tiny_model(family)
    image_id = model.config.image_token_id
    input_ids = torch.tensor([[1, 3] + [image_id] * 8 + [4, 40, 41]])  # t = 2 frames of 2 x 2 tokens
    grid_thw = torch.tensor([[2, 4, 4]])
    adapter = adapter_for(model)
    layout = adapter.visual_layout(input_ids, {"image_grid_thw": grid_thw})
    assert layout.image_index[0].tolist() == [0] * 8
    assert layout.row[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert layout.col[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert layout.grid_h[0].tolist() == layout.grid_w[0].tolist() == [2] * 8
    positions, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == image_id).long(), image_grid_thw=grid_thw
    )
    by_positions = adapter.visual_layout(input_ids, {"position_ids": positions})
    for field in ("image_index", "row", "col", "grid_h", "grid_w"):
        assert torch.equal(getattr(by_positions, field), getattr(layout, field)), field


def test_video_tokens_are_visual_tokens_with_frame_row_col(family: str) -> None:
    """A video is one item of the layout (one budget), its tokens frame after frame with (frame, row, col);
    items are numbered in prompt order (the video before the image here); the M-RoPE positions (what
    generate() hands the forward in transformers >= 5.23) say the same."""
    model = tiny_model(family)
    inputs = video_inputs(family)
    adapter = adapter_for(model)
    assert adapter.visual_token_mask(inputs["input_ids"]).sum().item() == 12
    layout = adapter.visual_layout(inputs["input_ids"], inputs)
    assert layout.seq_index[0].tolist() == [*range(2, 10), *range(13, 17)]
    assert layout.image_index[0].tolist() == [0] * 8 + [1] * 4
    assert layout.frames[0].tolist() == [0] * 4 + [1] * 4 + [0] * 4
    assert layout.row[0].tolist() == [0, 0, 1, 1] * 3
    assert layout.col[0].tolist() == [0, 1] * 6
    assert layout.grid_h[0].tolist() == layout.grid_w[0].tolist() == [2] * 12
    assert bool(layout.prunable[0].all())
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
    )
    by_positions = adapter.visual_layout(inputs["input_ids"], {"position_ids": positions})
    for field in ("image_index", "row", "col", "grid_h", "grid_w", "frames"):
        assert torch.equal(getattr(by_positions, field), getattr(layout, field)), field


def test_video_layout_errors_name_the_video_grid(family: str) -> None:
    adapter = adapter_for(tiny_model(family))
    inputs = video_inputs(family)
    with pytest.raises(ValueError, match=r"\[8\] video tokens per sample, which are not whole videos"):
        adapter.visual_layout(inputs["input_ids"], {**inputs, "video_grid_thw": torch.tensor([[2, 4, 6]])})
    with pytest.raises(ValueError, match="need image_grid_thw \\(video_grid_thw\\)"):
        adapter.visual_layout(inputs["input_ids"], {"image_grid_thw": inputs["image_grid_thw"]})


def test_video_tokens_are_pruned_with_one_budget_per_video(family: str) -> None:
    """keep=3 keeps 3 of the video's 8 tokens and 3 of the image's 4, in a forward and in generate(); the
    kept set is FastV's top-3 per item of the last prompt token's eager attention (mean over heads) in
    layer K - 1; keeping everything equals the untouched model."""
    model, eager = tiny_model(family), tiny_model(family, "eager")
    inputs = video_inputs(family)
    with torch.no_grad():
        untouched = model(**inputs).logits
        attention = eager(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(dim=0)  # (L,)
        with Pruner(model, build_strategy("fastv", keep=None, ratio=1.0, layer=2)):
            torch.testing.assert_close(model(**inputs).logits, untouched, atol=1e-5, rtol=0)
        with Pruner(model, build_strategy("fastv", keep=3, layer=2)) as pruner:
            pruned = model(**inputs).logits
            kept = pruner.last_record.kept_raster
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    spans = [list(range(2, 10)), list(range(13, 17))]
    expected = [
        sorted(sorted(range(len(s)), key=lambda i, s=s: (-float(attention[s[i]]), i))[:3]) for s in spans
    ]
    assert kept == [expected]
    assert pruner.last_record.kept_raster == kept  # generate()'s prefill placed the video the same way
    assert pruned.shape[1] == inputs["input_ids"].shape[1] - (8 - 3) - (4 - 3)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_budget_per_frame_keeps_the_budget_in_every_frame(family: str) -> None:
    """model.adapter=qwen2_vl_frames: each of the video's 2 frames is an item with its own top-2 (FastV's
    choice within the frame, from the eager reference), the image one more item; the default keeps 2 of the
    whole video."""
    model, eager = tiny_model(family), tiny_model(family, "eager")
    inputs = video_inputs(family)
    with torch.no_grad():
        attention = eager(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(dim=0)  # (L,)
        with Pruner(model, build_strategy("fastv", keep=2, layer=2), "qwen2_vl_frames") as per_frame:
            model(**inputs)
        with Pruner(model, build_strategy("fastv", keep=2, layer=2)) as per_video:
            model(**inputs)
    spans = [list(range(2, 6)), list(range(6, 10)), list(range(13, 17))]  # frame 0, frame 1, the image
    expected = [sorted(sorted(span, key=lambda p: (-float(attention[p]), p))[:2]) for span in spans]
    assert per_frame.last_record.kept_raster == [
        [[span.index(p) for p in chosen] for span, chosen in zip(spans, expected, strict=True)]
    ]
    assert [len(kept) for kept in per_video.last_record.kept_raster[0]] == [2, 2]


def test_tiny_model_saves_and_loads_with_the_auto_class(family: str, tmp_path) -> None:
    """The pipeline loads models with AutoModelForImageTextToText; the adapter is found for what it loads."""
    from transformers import AutoModelForImageTextToText

    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert type(loaded) is type(model)
    assert isinstance(adapter_for(loaded), Qwen2VLAdapter)
    inputs = sample_inputs(family, 1)
    with torch.no_grad(), Pruner(loaded, build_strategy("pore_linear", keep=KEEP)) as pruner:
        logits = loaded(**inputs).logits
    with torch.no_grad(), Pruner(model, build_strategy("pore_linear", keep=KEEP)) as expected:
        torch.testing.assert_close(logits, model(**inputs).logits, atol=1e-6, rtol=0)
    assert pruner.last_record.kept_raster == expected.last_record.kept_raster


# ---------------------------------------------------------------------------------------------- the engine


def test_the_prior_changes_the_choice_towards_the_top_rows(family: str) -> None:
    model = tiny_model(family)
    inputs = sample_inputs(family, 0)  # one 4 x 4 grid
    mean_rows = {}
    for alpha in (0.0, 0.95):
        strategy = build_strategy("pore_linear", keep=4, prior={"alpha": alpha})
        with torch.no_grad(), Pruner(model, strategy) as pruner:
            model(**inputs)
        rows = [r // 4 for r in pruner.last_record.kept_raster[0][0]]
        mean_rows[alpha] = sum(rows) / len(rows)
    assert mean_rows[0.95] < mean_rows[0.0]


def test_cached_forward_steps_use_the_full_layers_length(family: str) -> None:
    """Plain forwards with a cache: positions of new tokens come from layer 0's length (every token) plus the
    prefill's rope_deltas, not from a pruned layer's shorter length."""
    model = tiny_model(family)
    inputs = sample_inputs(family, 1)
    length = inputs["input_ids"].shape[1]
    strategy = build_strategy("fastv", keep=KEEP, layer=2)
    with torch.no_grad():
        model(**inputs)
        untouched_deltas = model.model.rope_deltas.clone()
        with Pruner(model, strategy):
            generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, length:].tolist()
            out = model(**inputs, use_cache=True)
            assert torch.equal(model.model.rope_deltas, untouched_deltas)
            cache, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
            for _ in range(4):
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
    assert until_eos(tokens) == generated
    pruned = length + 4 - (15 + 8 - 2 * KEEP)
    assert [cache.get_seq_length(i) for i in range(4)] == [length + 4, length + 4, pruned, pruned]


def test_record_counts_image_tokens_per_layer(family: str) -> None:
    model = tiny_model(family)
    inputs = make_inputs(family, SAMPLES)
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=2, layer=3)) as pruner:
        model(**inputs)
    record = pruner.last_record
    before, after = [16, 23, 15], [2, 4, 2]
    assert record.visual_tokens.tolist() == [before] * 3 + [after]
    real = inputs["attention_mask"].sum(dim=1).tolist()
    assert record.sequence_lengths.tolist() == [real] * 3 + [
        [n - (x - y) for n, x, y in zip(real, before, after, strict=True)]
    ]


def test_ratio_budget_is_per_image(family: str) -> None:
    model = tiny_model(family)
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=None, ratio=0.5)) as pruner:
        model(**make_inputs(family, SAMPLES))
    assert [[len(kept) for kept in images] for images in pruner.last_record.kept_raster] == [[8], [8, 4], [8]]


def test_keep_larger_than_an_image_says_so(family: str) -> None:
    model = tiny_model(family)
    with (
        torch.no_grad(),
        Pruner(model, build_strategy("fastv", keep=9)),
        pytest.raises(ValueError, match="larger than"),
    ):
        model(**sample_inputs(family, 1))


# ---------------------------------------------------------------------------------------------- the pipeline


def test_the_pipeline_collator_gives_inputs_the_pruner_runs_on(family: str) -> None:
    """PromptCollator (chat template + processor, as `python src/run.py` uses it) with images of different
    sizes: valid Qwen inputs, and each sample answers the same alone or in the padded batch."""
    model = tiny_model(family)
    collate = PromptCollator(processor(family))
    questions = ["what colour is the circle?", "what shape is in the bottom right of the image?"]
    images = [image((42, 70), seed=1), image((84, 56), seed=2)]
    batch = collate(
        [Sample(str(i), q, ["red"], im) for i, (q, im) in enumerate(zip(questions, images, strict=True))]
    )
    inputs = batch.inputs
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"} <= set(
        inputs
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 10], [1, 12, 8]]
    assert batch.prompts[0].startswith("<|im_start|>system\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>what colour" in batch.prompts[0]
    assert bool(inputs["attention_mask"][:, -1].all())  # left padding
    strategy = build_strategy("pore_linear", keep=4)
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        length = inputs["input_ids"].shape[1]
        answers = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
        kept = pruner.last_record.kept_raster
        for b in range(2):
            alone = collate([Sample(str(b), questions[b], ["red"], images[b])]).inputs
            alone_answer = model.generate(**alone, max_new_tokens=4, do_sample=False)[
                0, alone["input_ids"].shape[1] :
            ]
            assert until_eos(alone_answer) == until_eos(answers[b])
            assert pruner.last_record.kept_raster == [kept[b]]


def test_pil_images_of_any_mode_are_accepted(family: str) -> None:
    grey = Image.new("L", (56, 56), color=128)
    inputs = PromptCollator(processor(family))([Sample("0", "what colour?", ["grey"], grey)]).inputs
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]


# ---------------------------------------------------------------------------------------------- methods


def test_pyramid_stages_leave_fewer_tokens_in_each_cache_layer(family: str) -> None:
    model = tiny_model(family)
    inputs = sample_inputs(family, 0)  # one 4 x 4 image
    length = inputs["input_ids"].shape[1]
    strategy = build_strategy(
        "pdrop", layer=[1, 3], keep=[8, 2], ratio=[0.5, 0.25], prior={"name": "linear", "alpha": 0.9}
    )
    with torch.no_grad(), Pruner(model, strategy):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    total = length + 2  # the last generated token is never fed back
    cache = out.past_key_values
    assert [cache.get_seq_length(i) for i in range(4)] == [total, total - 8, total - 8, total - 14]


def test_pooling_keeps_one_token_per_window_of_the_dynamic_grid(family: str) -> None:
    model = tiny_model(family)
    with torch.no_grad(), Pruner(model, build_strategy("pool", keep=4)) as pruner:
        model(**make_inputs(family, SAMPLES))
    kept = pruner.last_record.kept_raster[0][0]  # the 4 x 4 image: one token in each 2 x 2 quadrant
    assert sorted(((r // 4) // 2, (r % 4) // 2) for r in kept) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [[len(k) for k in images] for images in pruner.last_record.kept_raster] == [[4], [4, 4], [4]]


def test_vision_cls_scoring_is_refused_clearly(family: str) -> None:
    """Qwen's vision tower has no [CLS] token, so FasterVLM's score does not exist for it."""
    model = tiny_model(family)
    strategy = build_strategy("fastervlm", keep=KEEP)
    with (
        pytest.raises(ValueError, match="qwen2_vl models do not give"),
        torch.no_grad(),
        Pruner(model, strategy),
    ):
        model(**sample_inputs(family, 0))


def test_compact_positions_are_refused_and_official_keeps_the_m_rope_positions(family: str) -> None:
    """3-D M-RoPE positions cannot be renumbered: positions=compact says so; official (PyramidDrop's own is
    compact) keeps the original positions here, so it prunes exactly like positions=original."""
    model = tiny_model(family)
    with pytest.raises(ValueError, match="3-D M-RoPE positions that cannot be compacted"):
        Pruner(model, build_strategy("pdrop", layer=[1, 3], keep=[4, 2], ratio=None, positions="compact"))
    logits = {}
    for positions in ("official", "original"):
        strategy = build_strategy("pdrop", layer=[1, 3], keep=[4, 2], ratio=None, positions=positions)
        with torch.no_grad(), Pruner(model, strategy) as pruner:
            assert pruner.positions == "original"
            logits[positions] = model(**sample_inputs(family, 0)).logits
    torch.testing.assert_close(logits["official"], logits["original"], atol=0, rtol=0)
