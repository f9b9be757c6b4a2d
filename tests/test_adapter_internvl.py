"""The pruning engine inside a tiny random InternVL3 model (real transformers classes, built offline from
configs): the token layout (view, row, col) against the processor's tiles and the model's own pixel shuffle,
the thumbnail as the last view, and `python src/run.py` end to end on a saved tiny checkpoint with every
method. What every family satisfies (keeping everything, the kept set, padded batches, cached generation,
every method x prior) is tests/test_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from families import FAMILIES as CONTRACT_FAMILIES
from internvl_reference import SAMPLES, SIDE, make_inputs, processor, sample_images, tiny_model, views
from pipeline_fixtures import run_program, write_vqa_parquet
from pore import Pruner, build_strategy
from pore.adapters import adapter_for
from pore.adapters.internvl import InternVLAdapter
from pore.testing.tiny_internvl import TOKENS_PER_TILE, ImageOnlyInternVLProcessor, build_tiny_internvl
from pore.testing.tiny_llava import save_checkpoint

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends


def test_adapter_is_detected_and_in_the_contract_table() -> None:
    model = tiny_model()
    assert isinstance(adapter_for(model), InternVLAdapter)
    assert isinstance(adapter_for(model.model), InternVLAdapter)  # the bare InternVLModel
    assert "internvl" in CONTRACT_FAMILIES


def shuffled_patch_places(model) -> list[tuple[int, int]]:
    """(row, col) in the 4 x 4 token grid of each token of a view, as the model's own pixel shuffle lays
    them out: shuffle a grid of patch coordinates and read which 2 x 2 patches each token merged."""
    patches = 2 * SIDE
    rows = torch.arange(patches).repeat_interleave(patches).view(1, patches, patches, 1).float()
    cols = torch.arange(patches).repeat(patches).view(1, patches, patches, 1).float()
    coordinates = torch.cat([rows, cols], dim=-1)  # (1, 8, 8, 2) as get_image_features reshapes a view
    shuffled = model.model.pixel_shuffle(coordinates, scale_factor=model.config.downsample_ratio)
    merged = shuffled.reshape(-1, 4, 2)  # (16, 4 patches, (row, col)) in the order the tokens are fed
    assert bool((merged[:, :, 0].max(1).values - merged[:, :, 0].min(1).values == 1).all())  # 2 x 2 blocks
    return [(int(m[:, 0].min()) // 2, int(m[:, 1].min()) // 2) for m in merged]


def test_layout_matches_the_processors_views_and_the_models_pixel_shuffle() -> None:
    """Each sample's visual tokens are its `<IMG_CONTEXT>` placeholders; each image has as many views as
    the image processor made (tiles + thumbnail), 16 tokens each, at the (row, col) the model's own pixel
    shuffle gives them."""
    model = tiny_model()
    inputs = make_inputs()
    adapter = adapter_for(model)
    layout = adapter.visual_layout(inputs["input_ids"], inputs)
    places = shuffled_patch_places(model)
    assert sorted({v for b in range(len(SAMPLES)) for v in views(b)}) == [1, 3, 5]  # the geometries tested
    for b in range(len(SAMPLES)):
        valid = layout.valid[b]
        placeholders = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        assert layout.seq_index[b][valid].tolist() == placeholders.tolist()
        image, view, row, col = [], [], [], []
        for i, n in enumerate(views(b)):
            for v in range(n):
                image += [i] * TOKENS_PER_TILE
                view += [v] * TOKENS_PER_TILE
                row += [r for r, _ in places]
                col += [c for _, c in places]
        assert layout.image_index[b][valid].tolist() == image
        assert layout.part[b][valid].tolist() == view
        assert layout.row[b][valid].tolist() == row
        assert layout.col[b][valid].tolist() == col
        assert adapter.views(layout)[b][valid].tolist() == [views(b)[i] for i in image]
        assert bool(layout.prunable[b][valid].all())
        assert (
            layout.grid_h[b][valid].unique().tolist() == [SIDE] == layout.grid_w[b][valid].unique().tolist()
        )


def test_the_last_view_of_a_tiled_image_is_the_thumbnail() -> None:
    """The views the model encodes for a tiled image end with the whole image resized to one tile."""
    b = 1  # its first image is 40 x 80: 2 tiles + thumbnail
    image = sample_images(b)[0]
    tiled = processor().image_processor([image], return_tensors="pt")["pixel_values"]  # (3, 3, 32, 32)
    whole = processor().image_processor([image], crop_to_patches=False, return_tensors="pt")["pixel_values"]
    assert tiled.shape[0] == views(b)[0] == 3 and whole.shape[0] == 1
    torch.testing.assert_close(tiled[-1], whole[0])
    assert not torch.allclose(tiled[0], whole[0])


def test_a_run_of_image_tokens_that_is_not_whole_views_says_so() -> None:
    model = tiny_model()
    input_ids = make_inputs()["input_ids"][:1].clone()
    first = int((input_ids[0] == model.config.image_token_id).nonzero()[0])
    input_ids[0, first] = 1  # one placeholder fewer in the first image
    with pytest.raises(ValueError, match="multiple of 16 image tokens"):
        adapter_for(model).visual_layout(input_ids)


def test_the_budget_is_per_image_over_all_its_views() -> None:
    model = tiny_model()
    inputs = make_inputs()
    with torch.no_grad(), Pruner(model, build_strategy("pore_linear", keep=None, ratio=0.25)) as pruner:
        model(**inputs)
    kept = pruner.last_record.kept_raster
    assert [[len(k) for k in images] for images in kept] == [
        [round(0.25 * TOKENS_PER_TILE * n) for n in views(b)] for b in range(len(SAMPLES))
    ]


def test_the_checkpoint_writer_writes_a_folder_the_auto_model_class_loads(tmp_path: Path) -> None:
    """`python -m pore.testing.tiny_internvl OUT` (its `main`, in process)."""
    from transformers import AutoModelForImageTextToText

    from pore.testing.tiny_internvl import main

    main([str(tmp_path / "tiny"), "--text-layers", "2"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny")
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers == 2
    assert (tmp_path / "tiny" / "processor_config.json").exists()


# ------------------------------------------------------------------------------------------ run.py end to end

# What `python src/run.py model=internvl3_1b model.path=<tiny> strategy=<s>` does with each method: every
# method but FasterVLM runs. SparseVLM's stages (after layers 2 / 6 / 15, 300 / 200 / 110 tokens) are scaled
# to the tiny model.
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
    """A tiny InternVL3 checkpoint whose processor is the image-only subclass of `InternVLProcessor` (no
    torchvision here), registered with `AutoProcessor` so that `from_pretrained` finds it by the class name
    the folder records."""
    from transformers import AutoProcessor, InternVLConfig

    AutoProcessor.register(InternVLConfig, ImageOnlyInternVLProcessor, exist_ok=True)
    model = build_tiny_internvl(len(processor().tokenizer))
    path = save_checkpoint(model, processor(), tmp_path_factory.mktemp("model") / "tiny-internvl")
    if not isinstance(AutoProcessor.from_pretrained(path), ImageOnlyInternVLProcessor):
        # transformers 5.17's AutoProcessor does not look the saved class name up among registered ones.
        pytest.skip("AutoProcessor here does not load a processor class registered at run time")
    return path


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vqa_parquet(tmp_path_factory.mktemp("data") / "vqa", samples=3)


def run(checkpoint: Path, benchmark: Path, out: Path, strategy: str, *extra: str):
    return run_program(
        "model=internvl3_1b",
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
    result = run(checkpoint, benchmark, tmp_path / strategy, strategy, *RUNS[strategy])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / strategy / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and '"error": null' in rows[0]


def test_run_py_refuses_fastervlm(checkpoint: Path, benchmark: Path, tmp_path: Path) -> None:
    """Refused in one line (exit 2) when the strategy is resolved against the family: before the weights."""
    result = run(checkpoint, benchmark, tmp_path / "fastervlm", "fastervlm")
    assert result.returncode == 2  # one line, before the weights load
    assert "fastervlm scores with the vision tower's [CLS] attention" in result.stderr
    assert "internvl models do not give" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("config", ["internvl3_1b", "internvl3_2b", "internvl3_8b", "internvl3_14b"])
def test_real_checkpoints_compose_and_are_refused_offline_in_one_line(config: str, tmp_path: Path) -> None:
    result = run_program(f"model={config}", "data=vqav2", f"output_dir={tmp_path}", "logger=none")
    assert result.returncode == 2
    assert "is a hub id that is not in the local cache" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
