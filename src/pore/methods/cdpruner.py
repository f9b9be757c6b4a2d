"""CDPruner (Zhang et al., NeurIPS 2025): instruction-conditioned DPP over the image tokens, before the LLM.

The official rule (Theia-4869/CDPruner, `encode_images` in `llava/model/llava_arch.py`, the text side in
`llava/model/multimodal_encoder/clip_encoder.py`):

1. relevance: the vision tower's features (the layer the LLM reads) through CLIP's `post_layernorm` and
   `visual_projection`, against the instruction's CLIP text embeddings (the text cut into segments of the
   text tower's length, zero-padded, one embedding each): r = -(mean over segments of the cosine), min-max
   normalised over the image's tokens, (r - min + 1e-6) / (max - min);
2. similarity: the cosine of the projected image tokens (the LLM's input embeddings);
3. kernel L = diag(r) S diag(r), and the greedy MAP of the DPP (Chen et al.'s fast update): repeatedly take
   the token with the largest remaining gain d_i^2, update every gain with its Cholesky row.

The kept tokens are removed (`positions=official` = `compact`). Every image of the batch runs at once: the
greedy steps are a Python loop (the rule is sequential), each step one batched update, O(N k^2) in all.

The CLIP text tower is a model of its own: `options.text_encoder` names the vision tower's CLIP checkpoint
(`model.text_encoder` in the model config: openai/clip-vit-large-patch14-336 for LLaVA-1.5), loaded once;
`embedded` builds the deterministic tiny CLIP of `pore.testing.tiny_clip` (the embedded model has no CLIP
pair). The instruction comes from `Pruner.set_texts` (the pipeline hands each question).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.image_groups import image_groups
from pore.methods.requests import ImageEmbeddings, VisionHiddenStates

FEATURES = VisionHiddenStates()  # (B, N, D_v) the vision features the LLM reads, per token


@functools.cache
def load_text_encoder(source: str, vision_hidden: int) -> tuple[nn.Module, object]:
    """(CLIPModel, tokenizer) of `source` (a checkpoint path or hub name, or `embedded`), loaded once."""
    if source == "embedded":
        from pore.testing.tiny_clip import build_tiny_clip

        return build_tiny_clip(vision_hidden)
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)


def text_embeddings(clip: nn.Module, tokenizer: object, text: str, device: torch.device) -> torch.Tensor:
    """(M, C) one CLIP text embedding per segment of the text tower's length (official: zero-padded)."""
    length = clip.config.text_config.max_position_embeddings
    encoded = tokenizer(text=text, return_tensors="pt")  # type: ignore[operator]
    total = encoded["input_ids"].shape[1]
    padding = length * ((total - 1) // length + 1) - total
    pieces = {
        key: torch.cat([value, value.new_zeros(1, padding)], dim=1).reshape(-1, length).to(device)
        for key, value in encoded.items()
        if key in ("input_ids", "attention_mask")
    }
    pooled = clip.text_model(**pieces).pooler_output
    return clip.text_projection(pooled)


def greedy_dpp(kernel: torch.Tensor, member: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Greedy MAP of the DPP with kernel (G, M, M) over each image's members (G, M): (G, K) the member picked
    at each step (-1 past an image's budget), K = the largest budget. Fast update: c_t (the Cholesky rows so
    far), gain d_i^2 = L_ii - sum_t c_t,i^2."""
    groups, width = member.shape
    steps = int(budget.max()) if groups else 0
    rows = torch.arange(groups, device=kernel.device)
    order = torch.full((groups, steps), -1, dtype=torch.long, device=kernel.device)
    cis = kernel.new_zeros(steps, groups, width)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone().masked_fill(~member, -torch.inf)  # (G, M)
    for i in range(steps):
        j = gains.argmax(dim=1)  # (G,)
        order[:, i] = j
        previous = torch.einsum("tg,tgn->gn", cis[:i, rows, j], cis[:i])
        scale = gains[rows, j].clamp(min=1e-12).sqrt()[:, None]  # exhausted images: ignored below
        cis[i] = (kernel[rows, j] - previous) / scale
        gains = gains - cis[i].square()
        gains[rows, j] = -torch.inf
    within = torch.arange(steps, device=order.device)[None, :] < budget[:, None]
    return order.masked_fill(~within, -1)


@METHODS.register("cdpruner")
class CDPruner(PruningMethod):
    official_positions = "compact"  # the official code drops the tokens before the LLM
    prior_use = "none"  # relevance x diversity, not the LLM's attention: no position bias to correct
    max_stages = 1
    requests = (FEATURES, ImageEmbeddings())

    def __init__(self, seed: int = 0, text_encoder: str | None = None, theta: float | None = None) -> None:
        super().__init__(seed)
        self.check_options({"text_encoder": text_encoder})
        if theta is not None and not 0.0 <= theta < 1.0:
            raise ValueError(f"cdpruner: options.theta must be null or in [0, 1), got {theta!r}")
        self.text_encoder, self.theta = text_encoder, theta

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Also when the strategy resolves (before the weights load): a text encoder must be named."""
        super().check_options(options)
        if not options.get("text_encoder"):
            raise ValueError(
                "cdpruner: needs the vision tower's CLIP text pair; set model.text_encoder (or "
                "strategy.options.text_encoder) to its checkpoint, e.g. openai/clip-vit-large-patch14-336"
            )

    def _relevance(self, inputs: ScoringInputs, features: torch.Tensor) -> torch.Tensor:
        """(B, N) float32: minus the mean cosine of each token's CLIP image embedding with the sample's
        instruction segments (normalised per image afterwards)."""
        if inputs.texts is None or len(inputs.texts) != features.shape[0]:
            raise ValueError(
                "cdpruner: ranks by the instruction, but no text was given for this batch; call "
                "pruner.set_texts([one instruction per sample]) before generate() (src/run.py does it)"
            )
        clip, tokenizer = load_text_encoder(self.text_encoder, features.shape[-1])
        clip = clip.to(features.device)
        with torch.no_grad():
            vision = clip.vision_model.post_layernorm(features.float().to(clip.dtype))
            image = nn.functional.normalize(clip.visual_projection(vision).float(), dim=-1)  # (B, N, C)
            relevance = []
            for b, text in enumerate(inputs.texts):  # per sample: its own number of text segments
                segments = nn.functional.normalize(
                    text_embeddings(clip, tokenizer, text, features.device), dim=-1
                )
                relevance.append(-(image[b] @ segments.float().T).mean(dim=-1))  # (N,)
        return torch.stack(relevance)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        if inputs.vision_views is not None:
            raise NotImplementedError(
                "cdpruner: images encoded as several views (LLaVA-NeXT) are not supported: the official "
                "code selects within each view; use a LLaVA-1.5 model"
            )
        groups = image_groups(inputs)
        relevance = groups.gather(self._relevance(inputs, inputs[FEATURES]))  # (G, M)
        low = relevance.masked_fill(~groups.member, torch.inf).min(dim=1, keepdim=True).values
        high = relevance.masked_fill(~groups.member, -torch.inf).max(dim=1, keepdim=True).values
        relevance = ((relevance - low + 1e-6) / (high - low)).masked_fill(~groups.member, 0.0)
        if self.theta is not None:  # the official code's commented alternative: exp(alpha r)
            relevance = torch.exp(self.theta / (2 * (1 - self.theta)) * relevance) * groups.member
        embeddings = nn.functional.normalize(groups.gather(inputs[ImageEmbeddings()]).float(), dim=-1)
        similarity = embeddings @ embeddings.transpose(1, 2)  # (G, M, M)
        kernel = relevance[:, :, None] * similarity * relevance[:, None, :]
        budget = torch.minimum(groups.budget, groups.member.sum(1))
        order = greedy_dpp(kernel, groups.member, budget)  # (G, K)
        return groups.scatter_order(order, inputs.layout.seq_index.shape)  # (B, N)
