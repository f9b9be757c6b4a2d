"""FastV's official mask implementation (`strategy.options.rerank=every_token`) against a by-hand run.

The reference is written from FastV's official modeling_llama.py (the `elif USE_FAST_V` branch, with the KV
cache, as its evaluation scripts run it), layer by layer on the real tiny LLaVA with eager attention and no
pruning engine: every token stays; at the prompt and at each generated token, the last token's attention in
layer K-1 (head mean, read from the eager attention weights) times the prior picks the top `keep` image
tokens, and layers K and later get an additive mask that hides the other image tokens as keys (every query,
the cached ones included); greedy decoding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import IMAGE_TOKEN, TOKENS_PER_IMAGE, build_tiny_llava, left_pad, make_prompt, pixels
from pore import Pruner, build_strategy
from reference import merged_embeddings

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

K, KEEP, STEPS = 2, 9, 5
SIGMA = 1.5  # an exponential prior over the raster index, so that the weights apply at every step too
PROMPT = make_prompt([1, 5, 6], 1, [7, 8, 9, 10])


def official_fastv_mask(model, input_ids: torch.Tensor, pixel_values: torch.Tensor):
    """(generated token ids, per forward the kept raster ids, per forward the last logits) by hand."""
    language_model = model.model.language_model
    image = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten()  # (N,) sequence positions of the raster
    index = torch.arange(TOKENS_PER_IMAGE, dtype=torch.float64)
    weights = torch.exp(-SIGMA * index / (TOKENS_PER_IMAGE - 1))  # (N,)
    rows: list[torch.Tensor] = []
    hook = language_model.layers[K - 1].self_attn.register_forward_hook(
        lambda module, args, output: rows.append(output[1][0, :, -1, :].mean(dim=0).double())  # (L_total,)
    )
    cache, tokens, kept_history, logits_history = DynamicCache(), [], [], []
    hidden = merged_embeddings(model, input_ids, pixel_values)  # (1, L, D)
    positions = torch.arange(input_ids.shape[1])
    try:
        with torch.no_grad():
            for _ in range(STEPS):
                queries, total = hidden.shape[1], int(positions[-1]) + 1
                # Causal: query i (at position total - queries + i) sees keys 0..its position.
                causal = torch.arange(total)[None, :] <= (torch.arange(queries) + total - queries)[:, None]
                full = torch.where(causal, 0.0, float("-inf"))[None, None]  # (1, 1, q, total)
                cos_sin = language_model.rotary_emb(hidden, positions[None])
                for idx, layer in enumerate(language_model.layers):
                    mask = full
                    if idx >= K:
                        if idx == K:  # rank by this forward's layer K-1 attention of its last token
                            scores = rows[-1][image] * weights
                            ranking = sorted(range(TOKENS_PER_IMAGE), key=lambda i: (-float(scores[i]), i))
                            kept = sorted(ranking[:KEEP])
                            kept_history.append(kept)
                            hidden_keys = torch.zeros(total, dtype=torch.bool)
                            hidden_keys[image] = True
                            hidden_keys[image[kept]] = False
                        mask = full.masked_fill(hidden_keys[None, None, None, :], float("-inf"))
                    hidden = layer(
                        hidden,
                        attention_mask=mask,
                        position_embeddings=cos_sin,
                        position_ids=positions[None],
                        past_key_values=cache,
                        use_cache=True,
                    )
                logits = model.lm_head(language_model.norm(hidden))[0, -1]
                logits_history.append(logits)
                token = int(logits.argmax())
                tokens.append(token)
                hidden = language_model.embed_tokens(torch.tensor([[token]]))
                positions = torch.tensor([total])
    finally:
        hook.remove()
    return tokens, kept_history, logits_history


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_token_reranks_as_the_official_mask_implementation(attn: str) -> None:
    model = build_tiny_llava(attn)
    input_ids, pixel_values = torch.tensor([PROMPT]), pixels(1, seed=3)
    reference_model = build_tiny_llava("eager")
    tokens, kept, logits = official_fastv_mask(reference_model, input_ids, pixel_values)
    prior = {"name": "exponential", "sigma": SIGMA, "position": "index"}
    strategy = build_strategy("fastv", layer=K, keep=KEEP, prior=prior, options={"rerank": "every_token"})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        out = model.generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        reranked = pruner.reranked
        assert pruner.last_record.kept_raster == [[kept[0]]]  # the prompt's choice, as recorded
    assert [step[0][0] for step in reranked] == kept[: len(reranked)]
    assert len(reranked) == STEPS  # the prompt, then every generated token but the last
    assert len({tuple(k) for k in kept}) > 1  # the choice does change from token to token here
    assert out.sequences[0, input_ids.shape[1] :].tolist() == tokens
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], logits[step], atol=1e-4, rtol=0)


def test_the_default_prunes_once_and_differs() -> None:
    """rerank=prefill (default) removes the prompt's dropped tokens for good: same first token, and no
    re-ranking record."""
    model = build_tiny_llava("eager")
    input_ids, pixel_values = torch.tensor([PROMPT]), pixels(1, seed=3)
    prior = {"name": "exponential", "sigma": SIGMA, "position": "index"}
    with torch.no_grad(), Pruner(model, build_strategy("fastv", layer=K, keep=KEEP, prior=prior)) as pruner:
        once = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=STEPS, do_sample=False
        )
        assert pruner.reranked == []
    tokens, kept, _ = official_fastv_mask(model, input_ids, pixel_values)
    assert pruner.last_record.kept_raster == [[kept[0]]]
    generated = once[0, input_ids.shape[1] :].tolist()
    assert generated[0] == tokens[0] and generated != tokens  # the same prompt, other later tokens
    assert build_strategy("fastv").options == {}  # the option's default is FastV's own: prefill


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"options": {"rerank": "always"}},
            "unknown options.rerank 'always'; valid values: prefill, every_token",
        ),
        ({"positions": "compact"}, r"needs one pruning stage and strategy.positions=original"),
    ],
)
def test_bad_rerank_settings_are_refused(changes: dict, message: str) -> None:
    strategy = build_strategy("fastv", layer=K, keep=KEEP, options={"rerank": "every_token"})
    with pytest.raises(ValueError, match=message):
        Pruner(build_tiny_llava(), strategy.replace(**changes))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_padded_batch_reranks_as_each_sample_alone(attn: str) -> None:
    """Two prompts of different lengths, left-padded into one batch: the same tokens kept at every step and
    the same greedy answers as each sample alone."""
    model = build_tiny_llava(attn)
    prompts = [PROMPT, make_prompt([1, 11], 1, [12, 13, 14, 15, 16, 17])]
    input_ids, mask = left_pad(prompts)
    pixel_values = torch.cat([pixels(1, seed=b) for b in range(len(prompts))])
    strategy = build_strategy("fastv", layer=K, keep=KEEP, options={"rerank": "every_token"})
    generate = {"max_new_tokens": STEPS, "do_sample": False}
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        batch = model.generate(
            input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, **generate
        )
        batch_reranked = pruner.reranked
        for b, prompt in enumerate(prompts):
            alone = model.generate(
                input_ids=torch.tensor([prompt]), pixel_values=pixels(1, seed=b), **generate
            )
            assert alone[0, len(prompt) :].tolist() == batch[b, input_ids.shape[1] :].tolist()
            steps = len(pruner.reranked)
            assert [step[0] for step in pruner.reranked] == [step[b] for step in batch_reranked[:steps]]
