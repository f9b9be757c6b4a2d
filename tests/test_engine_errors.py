"""Bad input to the engine fails with a message that says what is wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TOKENS_PER_IMAGE, build_tiny_llava, left_pad, make_prompt, pixels
from pore import Pruner, build_strategy

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

PROMPT = make_prompt([1, 5], 1, [7, 8])


def test_budget_larger_than_the_image() -> None:
    """LLaVA-1.5's image-token count is fixed: a larger budget is refused when the pruner is built."""
    model = build_tiny_llava()
    with pytest.raises(
        ValueError, match=r"strategy.keep=37 is larger than the 36 prunable image tokens.*keep <= 36"
    ):
        Pruner(model, build_strategy("fastv", keep=TOKENS_PER_IMAGE + 1))


def test_right_padding_is_refused() -> None:
    model = build_tiny_llava()
    ids, mask = left_pad([PROMPT, [1, *PROMPT]])
    right_ids, right_mask = ids.clone(), mask.clone()
    right_ids[0] = torch.tensor([*PROMPT, 0])
    right_mask[0] = torch.tensor([1] * len(PROMPT) + [0])
    with (
        Pruner(model, build_strategy("fastv", keep=4)),
        pytest.raises(ValueError, match="padding_side = 'left'"),
    ):
        model(input_ids=right_ids, attention_mask=right_mask, pixel_values=pixels(2))


def test_inputs_embeds_without_input_ids() -> None:
    model = build_tiny_llava()
    embeds = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    with Pruner(model, build_strategy("fastv", keep=4)), pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds)


def test_layer_outside_the_model() -> None:
    model = build_tiny_llava(layers=4)
    with pytest.raises(ValueError, match=r"strategy.layer must be in \[1, 3\]"):
        Pruner(model, build_strategy("fastv", layer=4))


def test_one_pruner_per_model() -> None:
    model = build_tiny_llava()
    with Pruner(model, build_strategy("fastv", keep=4)), pytest.raises(RuntimeError, match="another Pruner"):
        Pruner(model, build_strategy("random", keep=4)).attach()


def test_static_cache_is_refused() -> None:
    model = build_tiny_llava()
    with (
        Pruner(model, build_strategy("fastv", keep=4)),
        pytest.raises(NotImplementedError, match="DynamicCache"),
    ):
        model.generate(
            input_ids=torch.tensor([PROMPT]),
            pixel_values=pixels(1),
            max_new_tokens=2,
            cache_implementation="static",
        )


def test_unsupported_model_lists_the_families() -> None:
    with pytest.raises(ValueError, match=r"supported families: (.+, )?llava, "):
        Pruner(nn.Linear(2, 2), build_strategy("fastv"))


def test_none_strategy_leaves_the_model_untouched() -> None:
    model = build_tiny_llava()
    with Pruner(model, build_strategy("none")) as pruner:
        assert not pruner.attached
        model(input_ids=torch.tensor([PROMPT]), pixel_values=pixels(1))
    assert pruner.last_record is None


def test_generation_without_cache_runs_and_scores_each_forward_afresh() -> None:
    model = build_tiny_llava()
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=4)) as pruner:
        out = model.generate(
            input_ids=torch.tensor([PROMPT]),
            pixel_values=pixels(1),
            max_new_tokens=3,
            do_sample=False,
            use_cache=False,
        )
    assert out.shape[1] == len(PROMPT) + 3
    assert pruner.last_record.sequence_lengths[-1, 0] == len(PROMPT) + 2 - (TOKENS_PER_IMAGE - 4)
