"""The wall-clock benchmark (src/bench.py, src/pore/bench/): shapes, honesty of the ideal and of eager FastV,
and an end-to-end run on a tiny model that writes every setting. CPU only, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline_fixtures import run_program
from pore import Pruner, build_strategy
from pore.app.bench import (
    Architecture,
    BenchSettings,
    EagerFastV,
    IdealReducer,
    Runner,
    Targets,
    build_model,
    count_parameters,
    make_workload,
    resolve_architecture,
)
from pore.app.bench.probes import added_hooks, hook_table
from pore.app.bench.report import check_targets, comparisons
from pore.app.bench.timing import Summary
from pore.app.bench.workload import Workload
from pore.testing.tiny_llava import tiny_llava_config

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKEN = 100
GRID = 6  # 36 image tokens


def tiny_architecture(layers: int = 4) -> Architecture:
    """A LLaVA-1.5-shaped model small enough for CPU tests (peaked attention: initializer_range 0.2)."""
    config = tiny_llava_config(
        vocab_size=128,
        image_token_id=IMAGE_TOKEN,
        pad_token_id=0,
        grid=GRID,
        patch_size=8,
        text_layers=layers,
    )
    return Architecture("tiny", "tests", config, None)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return build_model(tiny_architecture(), "cpu", torch.float32, "sdpa", weights="random", seed=1)


@pytest.fixture(scope="module")
def workload(tiny_model: torch.nn.Module) -> Workload:
    return make_workload(tiny_model.config, 3, "cpu", torch.float32, prefix_tokens=5, suffix_tokens=7, seed=2)


def kept_mask(pruner: Pruner, workload: Workload) -> torch.Tensor:
    """(B, N) bool from the pruner's public record: the raster indices it kept of each sample's image."""
    mask = torch.zeros(workload.batch, workload.image_tokens, dtype=torch.bool)
    for b, images in enumerate(pruner.last_record.kept_raster):
        mask[b, images[0]] = True
    return mask


# ---------------------------------------------------------------------------------------------- shapes


def test_llava15_architectures_build_the_real_shapes_without_network(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seven = resolve_architecture(None, "llava15_7b", "llava-hf/llava-1.5-7b-hf")
    text, vision = seven.config.text_config, seven.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (4096, 32, 32)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (32, 11008, 32064)
    assert text.rms_norm_eps == 1e-5 and text.rope_parameters["rope_theta"] == 10000.0
    assert text.max_position_embeddings == 4096
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (4096, 336, 14)
    assert vision.projection_dim == 768 and seven.config.image_token_id == 32000
    assert seven.config.vision_feature_layer == -2 and seven.config.projector_hidden_act == "gelu"
    assert seven.weights is None
    assert count_parameters(seven) == 7_063_427_072  # LLaVA-1.5-7B: 7.06 B

    thirteen = resolve_architecture("llava15_13b", "ignored", None)
    text = thirteen.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (5120, 40, 40)
    assert text.intermediate_size == 13824
    assert count_parameters(thirteen) == 13_351_494_656


def test_workload_has_llava15_prompt_shape() -> None:
    config = resolve_architecture("llava15_7b", "x", None).config
    work = make_workload(config, 2, "cpu", torch.float32)
    assert work.input_ids.shape == (2, 35 + 576 + 40) and work.pixel_values.shape == (2, 3, 336, 336)
    assert torch.equal(work.image_positions[0], torch.arange(35, 35 + 576))
    assert not bool((work.input_ids[:, work.text_positions[0]] == 32000).any())
    index = work.uniform_index(64)
    assert index.shape == (2, 75 + 64)
    assert bool((index.diff(dim=1) > 0).all())  # sorted, no repeats
    assert set(work.text_positions[0].tolist()) <= set(index[0].tolist())


def test_random_weights_are_finite_and_the_tiny_checkpoint_loads(tiny_model, workload) -> None:
    with torch.inference_mode():
        logits = tiny_model(**workload.model_inputs()).logits
    assert bool(torch.isfinite(logits).all()) and float(logits.std()) > 0
    shipped = resolve_architecture(None, "tiny_llava", str(ROOT / "assets" / "tiny-llava"))
    assert shipped.weights is not None  # the shipped checkpoint is benchmarked with its own weights


def test_summary_statistics() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    summary = Summary.of(values)
    assert (summary.median, summary.min, summary.max, summary.n) == (3.0, 1.0, 5.0, 5)
    assert summary.p10 == pytest.approx(1.4) and summary.p90 == pytest.approx(4.6)
    assert summary.samples == tuple(values)


# ---------------------------------------------------------------------------------------------- honesty


@pytest.mark.parametrize("strategy", ["fastv", "pore_linear"])
def test_ideal_with_the_pruners_kept_tokens_equals_the_pruned_run(tiny_model, workload, strategy) -> None:
    """The ideal does the same work from layer K on as the pruner, given the same tokens: same logits."""
    inputs = workload.model_inputs()
    with torch.inference_mode():
        with Pruner(tiny_model, build_strategy(strategy, keep=9, layer=2)) as pruner:
            pruned = tiny_model(**inputs, use_cache=True).logits
            pruned_tokens = tiny_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            kept = kept_mask(pruner, workload)
        with IdealReducer(tiny_model, 2, workload.kept_index(kept)):
            ideal = tiny_model(**inputs, use_cache=True).logits
            ideal_tokens = tiny_model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert ideal.shape == pruned.shape == (3, workload.length - workload.image_tokens + 9, 128)
    torch.testing.assert_close(ideal, pruned, rtol=1e-5, atol=1e-5)
    assert torch.equal(ideal_tokens, pruned_tokens)


@pytest.mark.parametrize("layer", [1, 2])  # a global layer, a sliding-window layer
def test_on_gemma3_the_ideal_gives_each_layer_kind_its_mask_rope_and_image_blocks(layer: int) -> None:
    """Gemma 3 (layers alternate sliding-window and global attention with their own RoPE bases; the tokens of
    one image attend to each other both ways; prompts longer than the window): the ideal given the pruner's
    kept tokens computes exactly what the pruned run does, at the prompt and while generating."""
    import gemma3_reference

    model = gemma3_reference.tiny_model()
    for b in range(len(gemma3_reference.PROMPTS)):
        inputs = gemma3_reference.sample_inputs(b)
        with torch.inference_mode():
            with Pruner(model, build_strategy("fastv", keep=5, layer=layer)) as pruner:
                pruned = model(**inputs).logits
                pruned_tokens = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            kept = gemma3_reference.kept_positions(inputs, pruner.last_record.kept_raster[0])
            with IdealReducer(model, layer, kept[None]):
                ideal = model(**inputs).logits
                ideal_tokens = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert ideal.shape == pruned.shape
        torch.testing.assert_close(ideal, pruned, rtol=1e-5, atol=1e-5)
        assert torch.equal(ideal_tokens, pruned_tokens)


@pytest.mark.parametrize("pruner_attention", ["sdpa", "eager"])
def test_eager_fastv_keeps_the_same_tokens_as_our_pruner(tiny_model, workload, pruner_attention) -> None:
    inputs = workload.model_inputs()
    try:
        with torch.inference_mode():
            tiny_model.set_attn_implementation({"text_config": pruner_attention})
            with Pruner(tiny_model, build_strategy("fastv", keep=9, layer=2)) as pruner:
                ours = tiny_model(**inputs, use_cache=True).logits
                kept = kept_mask(pruner, workload)
            tiny_model.set_attn_implementation({"text_config": "eager"})
            with EagerFastV(tiny_model, 2, 9, workload.image_positions, workload.text_positions) as fastv:
                theirs = tiny_model(**inputs, use_cache=True).logits
                theirs_tokens = tiny_model.generate(
                    **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False
                )
    finally:
        tiny_model.set_attn_implementation("sdpa")
    expected = torch.stack([torch.nonzero(row).flatten() for row in kept])
    assert torch.equal(fastv.last_kept, expected)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert theirs_tokens.shape == (3, workload.length + 3)


def test_eager_fastv_refuses_a_backend_without_attention_weights(tiny_model, workload) -> None:
    with pytest.raises(ValueError, match="eager"):
        EagerFastV(tiny_model, 2, 9, workload.image_positions, workload.text_positions)


def test_probes_find_exactly_the_hooks_a_pruner_adds(tiny_model) -> None:
    before = hook_table(tiny_model)
    with Pruner(tiny_model, build_strategy("fastv", keep=9, layer=2)):
        names = {name for name, *_ in added_hooks(tiny_model, before)}
    assert {"model.language_model", "model.language_model.layers.2", "model.language_model.layers.3"} <= names
    assert "model.language_model.layers.0" not in names and "model.language_model.layers.1" not in names
    assert not added_hooks(tiny_model, before)  # detached: nothing left behind


# ---------------------------------------------------------------------------------------------- the sweep


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(monkeypatch) -> None:
    """A prefill OOM retires a setting; a generation OOM keeps its prefill results; the rest runs on."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    original_mask = IdealReducer._mask

    def out_of_memory_when_decoding(self, hidden, padding, cache, *rest):
        if hidden.shape[1] == 1:
            out_of_memory()
        return original_mask(self, hidden, padding, cache, *rest)

    monkeypatch.setattr(EagerFastV, "select", out_of_memory)
    monkeypatch.setattr(IdealReducer, "_mask", out_of_memory_when_decoding)
    settings = BenchSettings.from_mapping(
        {
            "batch_sizes": [1],
            "budgets": [36, 9],
            "strategies": ["fastv"],
            "warmup": 0,
            "repeats": 1,
            "instrumented_repeats": 1,
            "generate_repeats": 1,
            "new_tokens": 2,
            "prompt": {"prefix_tokens": 4, "suffix_tokens": 4},
            "weights": "random",
        }
    )
    summary = Runner(settings, tiny_architecture()).run()
    records = {(r["approach"], r["implementation"]): r for r in summary["results"]}
    assert records[("fastv_eager", "eager")]["status"] == "oom"
    assert "prefill_ms" not in records[("fastv_eager", "eager")]
    ideal = records[("ideal", "sdpa")]
    assert ideal["status"] == "ok" and ideal["generate_status"] == "oom"
    assert ideal["prefill_ms"]["median"] > 0 and "generate_ms" not in ideal
    for key in (("pruned", "sdpa"), ("unpruned", "sdpa"), ("unpruned", "eager")):
        assert records[key]["status"] == "ok" and records[key]["generate_ms"]["median"] > 0
    (row,) = comparisons(summary["results"])
    assert row["speedup"] is not None and row["achieved_over_ideal"] is not None
    assert row["eager_fastv_ms"] is None and row["ours_vs_eager_fastv"] is None


def test_profile_writes_traces_with_the_hooks_named(tmp_path) -> None:
    settings = BenchSettings.from_mapping(
        {
            "batch_sizes": [1],
            "budgets": [36, 9],
            "strategies": ["fastv"],
            "warmup": 0,
            "repeats": 1,
            "instrumented_repeats": 0,
            "generate_repeats": 0,
            "prompt": {"prefix_tokens": 4, "suffix_tokens": 4},
            "weights": "random",
            "profile": True,
            "output": str(tmp_path / "report.json"),
        }
    )
    summary = Runner(settings, tiny_architecture()).run()
    profiled = {(p["setting"]["approach"], p["setting"]["budget"]) for p in summary["profiles"]}
    assert profiled == {("pruned", 9), ("ideal", 9), ("fastv_eager", 9)}
    for profile in summary["profiles"]:
        assert (
            Path(profile["trace"]).is_file() and Path(profile["trace"]).parent == tmp_path / "report-profiles"
        )
        assert "pore:model.language_model.layers.2:pre-hooks" in profile["table"]
    assert all("generate_ms" not in r and r["status"] == "ok" for r in summary["results"])


def test_a_family_whose_prompts_the_workload_cannot_build_is_refused_in_one_line() -> None:
    """The workload writes LLaVA-1.5 prompts: a Gemma 3 architecture is refused before anything is built."""
    from pore.app.bench.main import check_plan
    from pore.errors import UserError
    from pore.testing.tiny_gemma3 import build_tiny_gemma3

    config = build_tiny_gemma3().config
    with pytest.raises(UserError, match=r"is a gemma3 model, whose prompts it does not build yet"):
        check_plan(BenchSettings(), Architecture("tiny-gemma3", "in memory", config, None))


def test_a_model_too_large_for_the_machine_is_refused_with_a_hint(monkeypatch) -> None:
    import pore.app.bench.runner as runner

    monkeypatch.setattr(runner, "count_parameters", lambda architecture: 10**13)
    with pytest.raises(RuntimeError, match=r"bench\.architecture=llava15_small"):
        Runner(BenchSettings(), tiny_architecture()).run()


def test_targets_pass_and_fail() -> None:
    row = {
        "batch": 32,
        "budget": 64,
        "implementation": "sdpa",
        "strategy": "fastv",
        "status": "ok",
        "speedup": 3.2,
        "achieved_over_ideal": 0.85,
        "overhead_pct": 1.0,
        "memory_ratio_prefill": 0.6,
        "memory_ratio_generate": None,
        "ours_vs_eager_fastv": 1.4,
    }
    result = check_targets([row], Targets(), applicable=True, note="")
    verdicts = {check["target"]: check["verdict"] for check in result["checks"]}
    assert verdicts == {
        "prefill speed-up over unpruned": "PASS",
        "achieved / ideal speed-up": "FAIL",
        "scoring overhead, % of prefill": "PASS",
        "peak memory / unpruned (prefill)": "PASS",
        "peak memory / unpruned (generate)": "n/a",
        "eager FastV prefill / ours": "PASS",
    }
    assert check_targets([row], Targets(batch=8), applicable=True, note="") is None


def test_bench_command_runs_end_to_end_and_writes_every_setting(tmp_path) -> None:
    """`python src/bench.py` on the shipped tiny checkpoint: one repeat of everything, JSON + table."""
    output = tmp_path / "bench.json"
    command = [
        "model=tiny_llava",
        "bench.batch_sizes=[1,2]",
        "bench.budgets=[64,16,8]",
        "bench.warmup=0",
        "bench.repeats=1",
        "bench.instrumented_repeats=1",
        "bench.generate_repeats=1",
        "bench.new_tokens=2",
        "bench.prompt.prefix_tokens=6",
        "bench.prompt.suffix_tokens=6",
        "bench.targets.batch=2",
        "bench.targets.budget=8",
        f"bench.output={output}",
    ]
    done = run_program(*command, program="bench")  # src/bench.py, in process
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["schema"] == "pore.bench/1" and report["device"] == "cpu"
    assert report["clock"] == "process"  # one torch thread: CPU time, immune to other jobs on the machine
    assert report["environment"]["torch"] == torch.__version__
    assert report["model"]["name"] == "tiny-llava" and report["model"]["parameters"] > 0
    assert report["skipped"] == [
        {"implementation": "flash_attention_2", "reason": "flash_attention_2 needs a CUDA device"}
    ]

    expected = set()
    for batch in (1, 2):
        expected |= {(batch, "sdpa", "unpruned", 64, None), (batch, "eager", "unpruned", 64, None)}
        for budget in (16, 8):
            expected |= {
                (batch, "sdpa", "ideal", budget, None),
                (batch, "eager", "fastv_eager", budget, "fastv"),
            }
            expected |= {(batch, "sdpa", "pruned", budget, s) for s in ("fastv", "pore_linear")}
    results = report["results"]
    assert {
        (r["batch"], r["implementation"], r["approach"], r["budget"], r["strategy"]) for r in results
    } == expected
    assert len(results) == len(expected)
    for record in results:
        assert record["status"] == "ok", record
        assert record["prefill_ms"]["median"] > 0 and record["generate_ms"]["median"] > 0
        assert record["tokens_per_s"] > 0
        assert record["peak_memory_mb"] == {"prefill": None, "generate": None}  # CPU: no per-call peak
        assert record["kept_image_tokens"] == record["budget"]
        assert "vision_tower" in record["spans_ms"] and "attention_layer_k-1" in record["spans_ms"]
        if record["approach"] in ("pruned", "ideal", "fastv_eager"):
            assert record["hooks_ms"]["median"] > 0

    rows = report["comparisons"]
    assert len(rows) == 8
    for row in rows:
        for key in ("speedup", "ideal_speedup", "achieved_over_ideal", "overhead_pct", "generate_speedup"):
            assert row[key] is not None and row[key] > 0, (key, row)
        assert row["eager_fastv_ms"] > 0 and row["ours_vs_eager_fastv"] > 0
        assert row["achieved_over_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"], rel=1e-2)
    targets = report["targets"]
    assert targets["applicable"] is False  # not an H100 with LLaVA-1.5-7B
    assert {c["strategy"] for c in targets["checks"]} == {"fastv", "pore_linear"}
    assert all(c["verdict"] in ("PASS", "FAIL", "n/a") for c in targets["checks"])

    table = output.with_suffix(".md").read_text()
    assert "| 2 | sdpa | pore_linear | 8 |" in table and "targets (batch 2, keep 8, sdpa)" in table
    assert "targets (batch 2, keep 8, sdpa)" in done.stdout
