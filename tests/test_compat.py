"""What moves between transformers releases is read in one place, and a run that would prune nothing stops.

The tripwires are forced here the way a new release would trip them: a hook registered before the
pruner's hides or renames the KV cache (as 5.24 did by passing it as `cache=` instead of
`past_key_values=`), or the hook on the pruning layer does not run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache

from conftest import TOKENS_PER_IMAGE, build_tiny_llava, make_prompt, pixels
from pore import Pruner, build_strategy, compat
from pore.app.evaluation.module import VLMEvaluator
from pore.data import BENCHMARKS
from pore.engine.record import PruningRecord

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

ROOT = Path(__file__).resolve().parent.parent
PROMPT = make_prompt([1, 5, 6], 1, [7, 8, 9])


def generate(model: torch.nn.Module, **kwargs: Any) -> torch.Tensor:
    return model.generate(
        input_ids=torch.tensor([PROMPT]), pixel_values=pixels(1), max_new_tokens=4, do_sample=False, **kwargs
    )


def cache_keyword_seen(model: torch.nn.Module) -> list[str]:
    """The keywords under which the language model receives its KV cache in generate()."""
    seen: list[str] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.extend(key for key, value in kwargs.items() if isinstance(value, Cache))

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate(model)
    finally:
        handle.remove()
    return seen


def test_the_installed_release_is_in_the_tested_range() -> None:
    # CI runs the suite on the oldest and the newest release of the range; anything else is untested.
    installed = transformers.__version__
    assert compat.is_tested_version(), f"transformers {installed} is outside {compat.tested_range()}"


def test_pyproject_bounds_transformers_to_the_tested_range() -> None:
    (spec,) = re.findall(r'"transformers([<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert spec.replace(" ", "") == compat.tested_specifier()
    assert compat.tested_specifier() == ">=5.17.0,<5.25"


@pytest.mark.parametrize(
    ("release", "tested"),
    [("5.16.1", False), ("5.17.0", True), ("5.23.0", True), ("5.24.3", True), ("5.25.0", False)],
)
def test_tested_range_covers_patch_releases(release: str, tested: bool) -> None:
    assert compat.is_tested_version(release) is tested


def test_the_cache_is_read_under_the_keyword_this_release_uses() -> None:
    model = build_tiny_llava()
    keywords = set(cache_keyword_seen(model))
    assert keywords and keywords <= set(compat.CACHE_KEYWORDS)
    cache = DynamicCache()
    for keyword in compat.CACHE_KEYWORDS:
        assert compat.cache_from({keyword: cache, "attention_mask": None}) is cache
    assert compat.cache_from({"attention_mask": None}) is None


def test_a_cache_under_an_unknown_keyword_trips() -> None:
    with pytest.raises(compat.PruningTripwire, match=r"keyword 'kv_store'.*transformers \d+\.\d+"):
        compat.cache_from({"kv_store": DynamicCache()})


def test_causal_mask_matches_the_language_models_own() -> None:
    """compat.causal_mask passes the cache under the keyword create_causal_mask takes in this release:
    with a cache holding 5 tokens, 2 new queries see 7 keys (a mask built without the cache sees 2)."""
    model = build_tiny_llava(attn_implementation="eager")
    config = model.model.language_model.config
    cache = DynamicCache()
    for layer in range(config.num_hidden_layers):
        kv = torch.zeros(1, config.num_key_value_heads, 5, config.hidden_size // config.num_attention_heads)
        cache.update(kv, kv, layer)
    embeds = torch.zeros(1, 2, config.hidden_size)
    padding = torch.ones(1, 7, dtype=torch.bool)
    mask = compat.causal_mask(config, embeds, padding, cache, layer_idx=1)
    assert mask.shape[-2:] == (2, 7)
    allowed = mask[0, 0] == 0 if mask.dtype != torch.bool else mask[0, 0]
    assert allowed.tolist() == [[True] * 6 + [False], [True] * 7]


def _hide_cache(rename_to: str | None):
    """A language-model pre-hook that moves the cache to `rename_to` (None: drops it)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        for keyword in compat.CACHE_KEYWORDS:
            cache = kwargs.pop(keyword, None)
            if cache is not None and rename_to is not None:
                kwargs[rename_to] = cache
        return args, kwargs

    return hook


def test_a_renamed_cache_trips_before_anything_is_pruned() -> None:
    model = build_tiny_llava()
    model.model.language_model.register_forward_pre_hook(_hide_cache("kv_store"), with_kwargs=True)
    with (
        Pruner(model, build_strategy("fastv", keep=8)),
        pytest.raises(compat.PruningTripwire, match=rf"'kv_store'.*transformers {transformers.__version__}"),
    ):
        generate(model)


def test_a_hidden_cache_trips_at_the_first_decoding_step() -> None:
    """Without the cache, a decoding step looks like a one-token prompt with no image: the pruner must not
    take it for a new prompt (that overwrote the prompt's record and pruned nothing under 5.24)."""
    model = build_tiny_llava()
    model.model.language_model.register_forward_pre_hook(_hide_cache(None), with_kwargs=True)
    with (
        Pruner(model, build_strategy("fastv", keep=8)),
        pytest.raises(compat.PruningTripwire, match=r"decoding step reached the pruner as a new prompt"),
    ):
        generate(model)


def test_a_prompt_that_is_not_pruned_trips() -> None:
    model = build_tiny_llava()
    with Pruner(model, build_strategy("fastv", keep=8, layer=2)):
        layer = model.model.language_model.layers[2]
        layer._forward_pre_hooks.clear()  # as if this release called the decoder layers another way
        with pytest.raises(compat.PruningTripwire, match=r"without being pruned.*decoder layer 2"):
            model(input_ids=torch.tensor([PROMPT]), pixel_values=pixels(1))


def test_no_tripwire_on_a_normal_generation() -> None:
    model = build_tiny_llava()
    with Pruner(model, build_strategy("fastv", keep=8)) as pruner:
        generate(model)
        assert pruner.last_record.visual_tokens[:, 0].tolist() == [TOKENS_PER_IMAGE] * 2 + [8] * 2


def _evaluator(model: torch.nn.Module) -> VLMEvaluator:
    benchmark = BENCHMARKS.get("spatial")()
    return VLMEvaluator(model, processor=None, strategy=build_strategy("fastv", keep=8), benchmark=benchmark)


def test_rows_of_a_batch_the_pruner_did_not_prune_fail_the_run() -> None:
    model = build_tiny_llava()
    evaluator = _evaluator(model)
    inputs = {"input_ids": torch.tensor([PROMPT, PROMPT])}
    with pytest.raises(compat.PruningTripwire, match="left no pruning record"):
        evaluator._check_pruned(inputs, None, torch.zeros(4, 2, dtype=torch.long))
    with Pruner(model, build_strategy("fastv", keep=8)) as pruner:
        model(input_ids=inputs["input_ids"], pixel_values=pixels(2))
        record: PruningRecord = pruner.last_record
    evaluator._check_pruned(inputs, record, record.visual_tokens)  # a pruned batch passes
    zeros = torch.zeros_like(record.visual_tokens)
    with pytest.raises(compat.PruningTripwire, match=r"sample 0 .* 0 visual tokens kept of 0"):
        evaluator._check_pruned(inputs, record, zeros)
