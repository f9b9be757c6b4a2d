"""LLaVA-OneVision: the adapter's token layout against the real processor and model, and what is the family's
own in the engine, on a tiny random `LlavaOnevisionForConditionalGeneration` (anyres tiles, unpadding, the
anyres_max shrink, base-only images of multi-image samples, newline tokens, no vision [CLS]), against the
geometry worked by hand in tests/onevision_reference.py. What every family satisfies is
tests/test_contract.py.

`python src/run.py` runs end to end on a tiny OneVision checkpoint whose processor is the image-only subclass
of the real class, registered with `AutoProcessor` (the real folder's processor loads its video part, which
needs torchvision: not installable beside this CPU torch build).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from families import onevision_model
from onevision_reference import (
    BASE_TOKENS,
    SIDE,
    expected_tokens,
    image,
    processor,
    prompt_inputs,
    sample_tokens,
)
from pipeline_fixtures import run_program, write_vqa_parquet
from pore import Pruner, build_strategy
from pore.adapters import adapter_class_for_config, adapter_for
from pore.adapters.llava_next import BASE, HIGH_RES, NEWLINE
from pore.adapters.llava_onevision import LlavaOnevisionAdapter
from pore.data.benchmark import Sample
from pore.data.collate import PromptCollator

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

PARTS = {"base": BASE, "high": HIGH_RES, "newline": NEWLINE}


def layout_rows(layout, b: int) -> list[tuple[int, int, int, int, int, bool]]:
    """(image, row, col, grid_h, grid_w, prunable) of sample b's valid slots."""
    valid = layout.valid[b]
    columns = [layout.image_index, layout.row, layout.col, layout.grid_h, layout.grid_w, layout.prunable]
    return list(zip(*[c[b][valid].tolist() for c in columns], strict=True))


def expected_rows(sizes) -> list[tuple[int, int, int, int, int, bool]]:
    return [
        (i, t.row, t.col, t.grid_h, t.grid_w, t.part != "newline")
        for i, tokens in enumerate(sample_tokens(sizes))
        for t in tokens
    ]


def image_features(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            batch_num_images=inputs["batch_num_images"],
        ).pooler_output


# ---------------------------------------------------------------------------------------------- layout


def test_adapter_is_detected_from_the_model_and_its_config() -> None:
    model = onevision_model()
    assert isinstance(adapter_for(model), LlavaOnevisionAdapter)
    assert adapter_class_for_config(model.config) is LlavaOnevisionAdapter
    facts = LlavaOnevisionAdapter.facts(model.config)
    assert (facts.family, facts.num_layers, facts.image_tokens, facts.pads_to_square) == (
        "llava_onevision",
        4,
        None,
        False,
    )


@pytest.mark.parametrize(
    ("size", "grid"),
    [((20, 40), (4, 8)), ((30, 30), (4, 4)), ((48, 30), (6, 4)), ((40, 40), (5, 5))],
)
def test_layout_of_a_lone_image_matches_the_processor_and_the_model_features(size, grid) -> None:
    """Counts equal the processor's placeholders and the model's packed features (the 8 x 8 grid of the
    40 x 40 image shrunk to 5 x 5 by anyres_max_2); the newlines sit where the model puts `image_newline`;
    the base view's tokens are the base view's features in raster order."""
    model = onevision_model()
    inputs = prompt_inputs([[size]])
    expected = expected_tokens(size)
    tokens = BASE_TOKENS + grid[0] * (grid[1] + 1)
    assert len(expected) == tokens
    assert int((inputs["input_ids"] == processor().image_token_id).sum()) == tokens
    features = image_features(model, inputs)[0]  # (T, D)
    assert features.shape[0] == tokens
    is_newline = (features == model.model.image_newline).all(dim=-1)
    assert is_newline.tolist() == [t.part == "newline" for t in expected]
    with torch.no_grad():
        base = model.model.vision_tower(inputs["pixel_values"][0, :1], output_hidden_states=True)
        base = model.model.multi_modal_projector(base.hidden_states[-1])[0]  # (S*S, D): SigLIP, no CLS
    torch.testing.assert_close(features[:BASE_TOKENS], base, atol=1e-6, rtol=0)

    image_tokens = LlavaOnevisionAdapter(model).image_tokens(*size)
    assert image_tokens.part.tolist() == [PARTS[t.part] for t in expected]
    assert image_tokens.row.tolist() == [t.row for t in expected]
    assert image_tokens.col.tolist() == [t.col for t in expected]
    assert image_tokens.grid_h.tolist() == [t.grid_h for t in expected]
    assert image_tokens.grid_w.tolist() == [t.grid_w for t in expected]


def test_images_of_a_multi_image_sample_are_base_views_with_one_newline() -> None:
    """batch_num_images > 1: no tiles, the base S x S grid then one newline per image (processor and model
    agree); the same sizes alone are tiled."""
    model = onevision_model()
    samples = [[(30, 30), (48, 30)], [(48, 30)]]
    inputs = prompt_inputs(samples)
    assert inputs["batch_num_images"].tolist() == [2, 1]
    counts = (inputs["input_ids"] == processor().image_token_id).sum(dim=1).tolist()
    assert counts == [2 * (BASE_TOKENS + 1), BASE_TOKENS + 6 * 5]
    assert [f.shape[0] for f in image_features(model, inputs)] == [BASE_TOKENS + 1] * 2 + [46]
    layout = LlavaOnevisionAdapter(model).visual_layout(inputs["input_ids"], inputs)
    for b, sizes in enumerate(samples):
        assert layout_rows(layout, b) == expected_rows(sizes)
        positions = (inputs["input_ids"][b] == processor().image_token_id).nonzero().flatten()
        assert layout.seq_index[b][layout.valid[b]].tolist() == positions.tolist()
    # The base-only newline is the image's last token: valid, not prunable, at the last base position.
    last = BASE_TOKENS
    assert (int(layout.row[0, last]), int(layout.col[0, last]), bool(layout.prunable[0, last])) == (
        SIDE - 1,
        SIDE - 1,
        False,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_from_pre_encoded_images_equals_layout_from_sizes(dtype: torch.dtype) -> None:
    """transformers >= 5.23: generate() gives the forward `mm_encoder_outputs` instead of the sizes."""
    model = onevision_model().to(dtype)
    try:
        adapter = adapter_for(model)
        inputs = prompt_inputs([[(20, 40)], [(30, 30), (48, 30)], [(40, 40)]])
        with torch.no_grad():
            encoded = model.model.get_image_features(
                pixel_values=inputs["pixel_values"].to(dtype),
                image_sizes=inputs["image_sizes"],
                batch_num_images=inputs["batch_num_images"],
                return_dict=True,
            )
        from_sizes = adapter.visual_layout(inputs["input_ids"], inputs)
        # Pre-encoded features win over sizes that set_image_sizes adds without batch_num_images.
        from_features = adapter.visual_layout(
            inputs["input_ids"],
            {"mm_encoder_outputs": {"image": encoded}, "image_sizes": inputs["image_sizes"]},
        )
    finally:
        model.to(torch.float32)
    for name in ("seq_index", "image_index", "row", "col", "grid_h", "grid_w", "valid", "prunable"):
        assert torch.equal(getattr(from_sizes, name), getattr(from_features, name)), name


def test_layout_errors_say_what_to_pass() -> None:
    adapter = adapter_for(onevision_model())
    inputs = prompt_inputs([[(20, 40)]])
    with pytest.raises(ValueError, match="needs image_sizes"):
        adapter.visual_layout(inputs["input_ids"], {})
    with pytest.raises(ValueError, match="LlavaOnevisionProcessor"):
        adapter.visual_layout(inputs["input_ids"], {"image_sizes": torch.tensor([[48, 30]])})
    with pytest.raises(ValueError, match="batch_num_images"):
        adapter.visual_layout(
            inputs["input_ids"],
            {"image_sizes": inputs["image_sizes"], "batch_num_images": torch.tensor([2])},
        )


# ---------------------------------------------------------------------------------------------- engine


def test_prior_moves_the_choice_towards_the_top_of_the_image() -> None:
    """A steep exponential row prior (sigma 8) keeps tokens higher up each grid than FastV alone does,
    measured by the kept tokens' mean relative row r / (H - 1) over the base and the shrunk 5 x 5 grid."""
    model = onevision_model()
    inputs = prompt_inputs([[(40, 40)]])
    tokens = LlavaOnevisionAdapter(model).image_tokens(40, 40)
    prunable = tokens.prunable
    relative = (tokens.row[prunable] / (tokens.grid_h[prunable] - 1)).tolist()  # per prunable token
    height = {}
    for name, prior in (("fastv", None), ("exponential", {"name": "exponential", "sigma": 8.0})):
        settings = {"keep": 10, "layer": 2} | ({"prior": prior} if prior else {})
        with torch.no_grad(), Pruner(model, build_strategy("fastv", **settings)) as pruner:
            model(**inputs)
        kept = pruner.last_record.kept_raster[0][0]
        assert len(kept) == 10
        height[name] = sum(relative[i] for i in kept) / len(kept)
    assert height["exponential"] < height["fastv"]


def test_fastervlm_is_refused_clearly() -> None:
    """SigLIP has no [CLS] token: FasterVLM's score does not exist for this family."""
    model = onevision_model()
    strategy = build_strategy("fastervlm", keep=4)
    with (
        pytest.raises(ValueError, match="llava_onevision models do not give"),
        torch.no_grad(),
        Pruner(model, strategy),
    ):
        model(**prompt_inputs([[(20, 40)]]))


def test_padding_suppression_is_refused() -> None:
    """OneVision never pads to a square (base view squashed, tiles' padding cropped)."""
    with pytest.raises(ValueError, match="do not pad images to a square"):
        Pruner(onevision_model(), build_strategy("pore_linear", prior={"suppress_padding": True}))


# ---------------------------------------------------------------------------------------------- pipeline


def test_the_pipeline_collator_gives_inputs_the_pruner_runs_on() -> None:
    """PromptCollator (chat template + processor, as `python src/run.py` uses it, here the real processor
    class without its video part): valid OneVision inputs, and each sample answers the same alone or in the
    padded batch."""
    model = onevision_model()
    collate = PromptCollator(processor())
    questions = ["what colour is the circle?", "what shape is in the bottom right of the image?"]
    images = [image((20, 40), seed=1), image((40, 40), seed=2)]
    samples = [
        Sample(str(i), q, ["red"], im) for i, (q, im) in enumerate(zip(questions, images, strict=True))
    ]
    inputs = collate(samples).inputs
    assert {"input_ids", "attention_mask", "pixel_values", "image_sizes"} <= set(inputs)
    counts = (inputs["input_ids"] == processor().image_token_id).sum(dim=1).tolist()
    assert counts == [len(expected_tokens((20, 40))), len(expected_tokens((40, 40)))]
    with torch.no_grad(), Pruner(model, build_strategy("pore_linear", keep=None, ratio=0.3)) as pruner:
        length = inputs["input_ids"].shape[1]
        answers = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
        kept = pruner.last_record.kept_raster
        assert [len(k[0]) for k in kept] == [round(0.3 * 48), round(0.3 * 41)]
        for b in range(2):
            alone = collate([samples[b]]).inputs
            alone_answer = model.generate(**alone, max_new_tokens=4, do_sample=False)
            assert alone_answer[0, alone["input_ids"].shape[1] :].tolist() == answers[b].tolist()
            assert pruner.last_record.kept_raster == [kept[b]]


@pytest.mark.parametrize("name", ["llava_onevision_05b", "llava_onevision_7b", "llava_onevision_72b"])
def test_model_configs_name_the_hub_checkpoint_and_are_refused_offline(name: str) -> None:
    """Each real size composes and, without network, stops before any weight with one line and exit 2."""
    size = name.removeprefix("llava_onevision_").replace("05b", "0.5b")
    result = run_program(f"model={name}", "logger=none")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert f"llava-hf/llava-onevision-qwen2-{size}-ov-hf" in lines[0] and "offline" in lines[0]


# ------------------------------------------------------------------------------------------ run.py end to end

# What `python src/run.py model=llava_onevision_05b model.path=<tiny> strategy=<s>` does with each method the
# family supports (the [CLS]-reading methods are refused: test_method_cls_families.py and below).
RUNS = {
    "none": [],
    "fastv": [],
    "pore_linear": [],
    "pore_exponential": [],
    "random": [],
    "pool": [],
    "pdrop": [],
    "sparsevlm": ["strategy.layer=[1,2,3]", "strategy.keep=[12,8,4]"],
    "dart": [],
    "divprune": [],
    "himap": [],
    "tokencarve": [],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OneVision checkpoint whose processor is the image-only subclass of `LlavaOnevisionProcessor`,
    registered with `AutoProcessor` so that `from_pretrained` finds it by the class name the folder
    records."""
    from transformers import AutoProcessor, LlavaOnevisionConfig

    from pore.testing.tiny_llava import save_checkpoint
    from pore.testing.tiny_onevision import ImageOnlyLlavaOnevisionProcessor, build_tiny_onevision_model

    AutoProcessor.register(LlavaOnevisionConfig, ImageOnlyLlavaOnevisionProcessor, exist_ok=True)
    images_only = processor()
    assert isinstance(images_only, ImageOnlyLlavaOnevisionProcessor)
    model = build_tiny_onevision_model(images_only)
    path = save_checkpoint(model, images_only, tmp_path_factory.mktemp("model") / "tiny-onevision")
    if not isinstance(AutoProcessor.from_pretrained(path), ImageOnlyLlavaOnevisionProcessor):
        # transformers 5.17's AutoProcessor does not look the saved class name up among registered ones.
        pytest.skip("AutoProcessor here does not load a processor class registered at run time")
    return path


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vqa_parquet(tmp_path_factory.mktemp("data") / "vqa", samples=3)


def run(checkpoint: Path, benchmark: Path, out: Path, strategy: str, *extra: str):
    return run_program(
        "model=llava_onevision_05b",
        f"model.path={checkpoint}",
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
    """A padded batch of images of different sizes (anyres tiles), generation with the pruned cache; every
    sample predicted once."""
    result = run(checkpoint, benchmark, tmp_path / strategy, strategy, *RUNS[strategy])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / strategy / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all('"error": null' in row for row in rows)


def test_run_py_refuses_fastervlm(checkpoint: Path, benchmark: Path, tmp_path: Path) -> None:
    """Refused in one line (exit 2) when the strategy is resolved against the family: before the weights."""
    result = run(checkpoint, benchmark, tmp_path / "fastervlm", "fastervlm")
    assert result.returncode == 2
    assert "llava_onevision models do not give" in result.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- video


def image_and_video_inputs(seed: int = 0) -> dict:
    """One sample: a lone 20 x 40 image (the processor's prompt), then a 2-frame video appended by hand (the
    video processor needs torchvision): 2 frames pooled 2 x 2 to 2 x 2 tokens each, then one newline, as
    `LlavaOnevisionProcessor` writes `<video>` placeholders, and seeded noise frames."""
    inputs = prompt_inputs([[(20, 40)]])
    proc = processor()
    words = proc.tokenizer.convert_tokens_to_ids(["what", "colour"])
    video = torch.tensor([[proc.video_token_id] * 9 + words])
    input_ids = torch.cat([inputs["input_ids"], video], dim=1)
    generator = torch.Generator().manual_seed(seed)
    return {
        **inputs,
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(1, 2, 3, 32, 32, generator=generator),
    }


def test_video_tokens_have_frame_row_col_and_a_fixed_newline() -> None:
    model = onevision_model()
    inputs = image_and_video_inputs()
    layout = LlavaOnevisionAdapter(model).visual_layout(inputs["input_ids"], inputs)
    image_tokens = len(expected_tokens((20, 40)))
    video = slice(image_tokens, image_tokens + 9)
    assert int(layout.valid.sum()) == image_tokens + 9
    assert layout.image_index[0].tolist() == [0] * image_tokens + [1] * 9
    assert layout.frames[0, video].tolist() == [0] * 4 + [1] * 5
    assert layout.row[0, video].tolist() == [0, 0, 1, 1] * 2 + [1]
    assert layout.col[0, video].tolist() == [0, 1] * 4 + [1]
    assert layout.grid_h[0, video].tolist() == [2] * 9
    assert layout.prunable[0, video].tolist() == [True] * 8 + [False]
    assert layout.frame_counts[0, video].tolist() == [2] * 9
    assert layout.frames[0, :image_tokens].tolist() == [0] * image_tokens
    positions = (inputs["input_ids"][0] == processor().video_token_id).nonzero().flatten()
    assert layout.seq_index[0, video].tolist() == positions.tolist()


def test_video_tokens_are_pruned_with_one_budget_per_video() -> None:
    """keep=3 keeps FastV's top-3 of the image's 48 prunable tokens and of the video's 8 (eager attention of
    the last prompt token in layer K - 1, mean over heads, written out by hand), the newlines on top; a
    forward and generate() (which encodes the video first in transformers >= 5.23) agree."""
    model, eager = onevision_model(), onevision_model("eager")
    inputs = image_and_video_inputs()
    image_positions = (inputs["input_ids"][0] == processor().image_token_id).nonzero().flatten().tolist()
    video_positions = (inputs["input_ids"][0] == processor().video_token_id).nonzero().flatten().tolist()
    prunable = [
        [p for p, t in zip(image_positions, expected_tokens((20, 40)), strict=True) if t.part != "newline"],
        video_positions[:-1],
    ]
    with torch.no_grad():
        attention = eager(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(dim=0)  # (L,)
        untouched = model(**inputs).logits
        with Pruner(model, build_strategy("fastv", keep=None, ratio=1.0, layer=2)):
            torch.testing.assert_close(model(**inputs).logits, untouched, atol=1e-5, rtol=0)
        with Pruner(model, build_strategy("fastv", keep=3, layer=2)) as pruner:
            pruned = model(**inputs).logits
            kept = pruner.last_record.kept_raster
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = []
    for positions in prunable:
        best = sorted(positions, key=lambda p: (-float(attention[p]), p))[:3]
        expected.append(sorted(positions.index(p) for p in best))
    assert kept == [expected]
    assert pruner.last_record.kept_raster == kept
    assert pruned.shape[1] == inputs["input_ids"].shape[1] - (48 - 3) - (8 - 3)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_budget_per_frame_keeps_the_budget_in_every_frame() -> None:
    """model.adapter=llava_onevision_frames: each of the video's 2 frames keeps its own top-2 (FastV's choice
    within the frame, eager reference), the newline on top; the image is one item as before."""
    model, eager = onevision_model(), onevision_model("eager")
    inputs = image_and_video_inputs()
    video = (inputs["input_ids"][0] == processor().video_token_id).nonzero().flatten().tolist()
    with torch.no_grad():
        attention = eager(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(dim=0)  # (L,)
        strategy = build_strategy("fastv", keep=2, layer=2)
        with Pruner(model, strategy, "llava_onevision_frames") as per_frame:
            model(**inputs)
        with Pruner(model, strategy) as per_video:
            model(**inputs)
    kept = per_frame.last_record.kept_raster[0]
    assert kept[0] == per_video.last_record.kept_raster[0][0]  # the image: unchanged
    for frame, span in enumerate((video[0:4], video[4:8])):
        best = sorted(span, key=lambda p: (-float(attention[p]), p))[:2]
        assert kept[1 + frame] == sorted(span.index(p) for p in best)
    assert len(kept) == 3 and [len(k) for k in per_video.last_record.kept_raster[0]] == [2, 2]
