"""Presets: conf/strategy/ composed by the library as by the run, resolved once, run as resolved.

The Python API (`build_strategy` + `Pruner`) and `python src/run.py` read the same files; what a `Pruner`
runs is what `Strategy.resolve` returns for its model, on any depth.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from conftest import build_tiny_llava, pixels
from pore import ModelFacts, Pruner, Strategy, build_strategy, presets
from pore.assets import asset_path
from pore.registry import UnknownNameError

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

EMBEDDED_TOKENS = 64  # the embedded model's 8 x 8 grid

# Presets written for LLaVA-1.5 (576 tokens, 32 layers) whose budgets or stages do not fit the 4-layer,
# 64-token embedded model as written, with the settings that fit (docs/configs.md, docs/pore_presets.md).
FOR_THE_EMBEDDED_MODEL = {
    "pore_authors_fastv": {"keep": 16},
    "pore_authors_pdrop": {"layer": [1, 2, 3]},
    "pore_authors_sparsevlm": {"layer": [1, 2, 3], "keep": [32, 16, 8]},
    "pore_authors_himap": {"keep": [16, 8]},
    "sparsevlm": {"layer": [1, 2, 3], "keep": [32, 16, 8]},
    "sparsevlm_128": {"layer": [1, 2, 3], "keep": [32, 16, 8]},
    "sparsevlm_96": {"layer": [1, 2, 3], "keep": [24, 12, 6]},
    "sparsevlm_64": {"layer": [1, 2, 3], "keep": [16, 8, 4]},
}
# Presets whose official count per image is data-dependent (PruMerge's IQR outliers), not the budget.
ADAPTIVE_COUNT = {"prumerge", "prumerge_plus"}

NAMED_FROM_PYTHON = {"cdpruner": {"options": {"text_encoder": "embedded"}}}


def test_a_40_layer_model_runs_pyramid_drop_before_layers_10_20_30() -> None:
    """The preset's stages (8/16/24 of 32) are scaled to the model the Pruner is built on, and the forward
    prunes exactly there (the visual tokens each decoder layer saw)."""
    model = build_tiny_llava(layers=40)
    prompt = torch.tensor([[1, 5, *([100] * 36), 7, 8]])
    with torch.no_grad(), Pruner(model, build_strategy("pdrop")) as pruner:
        assert pruner.strategy.layers == (10, 20, 30) and pruner.strategy.reference_depth is None
        assert [stage.layer for stage in pruner.stages] == [10, 20, 30]
        model(input_ids=prompt, pixel_values=pixels(1))
    record = pruner.last_record
    assert record.stage_layers == [10, 20, 30]
    visual = record.visual_tokens[:, 0].tolist()  # 36 -> 18 -> 9 -> 4 (ratios 0.5 / 0.25 / 0.125 of 36)
    assert visual == [36] * 10 + [18] * 10 + [9] * 10 + [4] * 10


def test_the_4_layer_model_runs_pyramid_drop_before_layers_1_2_3() -> None:
    model = build_tiny_llava(layers=4)
    with torch.no_grad(), Pruner(model, build_strategy("pdrop")) as pruner:
        model(input_ids=torch.tensor([[1, *([100] * 36), 7]]), pixel_values=pixels(1))
    assert pruner.last_record.stage_layers == [1, 2, 3]


@pytest.fixture(scope="module")
def embedded() -> tuple[LlavaForConditionalGeneration, object]:
    path = asset_path("tiny-llava")
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_runs_through_the_python_api_on_the_embedded_model(embedded, name: str) -> None:
    """build_strategy(name) -> Pruner -> generate() on the shipped checkpoint: each preset prunes every image
    to its budget before the layers it resolved to; a preset that does not fit this model as written is
    refused in one line when the Pruner is built, and runs with the documented settings."""
    from PIL import Image

    model, processor = embedded
    # CDPruner's CLIP pair comes from the model config in the pipeline; through the Python API it is named.
    strategy = build_strategy(name, **NAMED_FROM_PYTHON.get(name, {}))
    settings = FOR_THE_EMBEDDED_MODEL.get(name)
    if settings is not None:
        with pytest.raises(ValueError, match=r"^strategy\.(keep|layer)") as refused:
            Pruner(model, strategy, images_padded=True)
        assert "\n" not in str(refused.value)
        strategy = build_strategy(name, **settings)
    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 200))]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            add_generation_prompt=True,
        )
        for text in ("what colour is the shape?", "where is the blue square?")
    ]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad(), Pruner(model, strategy, images_padded=True) as pruner:
        pruner.set_image_sizes([[(48, 64)], [(40, 40)]])
        pruner.set_texts(["what colour is the shape?", "where is the blue square?"])  # CDPruner's instruction
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    if not strategy.prunes:
        assert pruner.last_record is None
        return
    resolved = strategy.resolve(ModelFacts("llava", 4, EMBEDDED_TOKENS, pads_to_square=True))
    record = pruner.last_record
    assert record.stage_layers == list(resolved.layers)
    last = resolved.stages()[-1]
    budget = last.budget(EMBEDDED_TOKENS)
    if name == "dart":  # its documented count: 4 image pivots + 8 pivots x budget // 8 picks each
        budget = 4 + 8 * (budget // 8)
    for kept in record.kept_raster:
        assert len(kept) == 1
        if name in ADAPTIVE_COUNT:
            assert 1 <= len(kept[0]) < EMBEDDED_TOKENS
        else:
            assert len(kept[0]) == budget


def test_unknown_presets_list_the_files() -> None:
    with pytest.raises(
        UnknownNameError, match=r"choose one of: ([a-z_0-9]+, )*fastervlm, fastv, himap, none, pdrop"
    ):
        build_strategy("fastvv")


def test_a_preset_is_its_files_composed() -> None:
    """pore_linear = strategy/fastv (= strategy/none + method/fastv) + prior/linear, deltas only."""
    linear = build_strategy("pore_linear")
    assert linear == Strategy.from_mapping(
        {
            **presets.compose_preset("strategy", "fastv"),
            "name": "pore_linear",
            "prior": presets.compose_preset("prior", "linear"),
        }
    )
    assert (linear.method, linear.layer, linear.ratio, linear.prior.name) == ("fastv", 2, 0.25, "linear")
    assert linear.prior.hyperparameters() == {"alpha": 0.6}
