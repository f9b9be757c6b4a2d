"""Synthetic prompts with the real shape of a LLaVA-1.5 request, and the index sets the reducers keep.

A LLaVA-1.5 prompt (vicuna_v1 template) is BOS + the system prompt + "USER:" (35 tokens: FastV's
`image_start` is 35), the image's 576 tokens, then the question, the answer-format suffix and "ASSISTANT:"
(about 40 tokens). Speed depends on the lengths, not the words, so the text is random token ids and the
image random pixels; they go through the model's own forward, so the vision tower and the image-token
merge run exactly as they would for a processor's output. Every sample has the same length: no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig


@dataclass
class Workload:
    """One batch of prompts on the benchmark device."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), all ones
    pixel_values: torch.Tensor  # (B, 3, S, S)
    image_positions: torch.Tensor  # (B, N) sequence positions of the image tokens, in raster order
    text_positions: torch.Tensor  # (B, L - N) every other position

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def image_tokens(self) -> int:
        return int(self.image_positions.shape[1])

    def model_inputs(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
        }

    def kept_index(self, kept_image: torch.Tensor) -> torch.Tensor:
        """(B, L') sorted sequence positions that survive when `kept_image` (B, N) bool image tokens are
        kept: every text token plus those image tokens, in their original order."""
        counts = kept_image.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError("every sample must keep the same number of image tokens")
        kept = self.image_positions[kept_image].view(self.batch, -1)
        return torch.cat([self.text_positions, kept], dim=1).sort(dim=1).values

    def uniform_index(self, keep: int) -> torch.Tensor:
        """(B, L') positions of a fixed, data-independent choice of `keep` evenly spaced image tokens."""
        n = self.image_tokens
        if not 0 < keep <= n:
            raise ValueError(f"keep must be in 1..{n}, got {keep}")
        chosen = torch.arange(keep, device=self.input_ids.device) * n // keep
        kept = torch.zeros(self.batch, n, dtype=torch.bool, device=self.input_ids.device)
        kept[:, chosen] = True
        return self.kept_index(kept)


def image_geometry(config: PretrainedConfig) -> tuple[int, int]:
    """(image tokens per image, image side in pixels) of a LLaVA-1.5-style config."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    return side * side + extra, int(vision.image_size)


def make_workload(
    config: PretrainedConfig,
    batch: int,
    device: torch.device | str,
    dtype: torch.dtype,
    prefix_tokens: int = 35,
    suffix_tokens: int = 40,
    seed: int = 0,
) -> Workload:
    """`batch` prompts of prefix + one image + suffix tokens; the same seed gives the same batch."""
    image_token = int(config.image_token_id)
    vocab = int(config.get_text_config().vocab_size)
    tokens_per_image, side = image_geometry(config)
    generator = torch.Generator().manual_seed(seed)
    # Ordinary text ids: above the usual specials (pad / bos / eos / unk) and never the image token.
    high = min(vocab, image_token) if image_token > 8 else vocab
    text = torch.randint(5, high, (batch, prefix_tokens + suffix_tokens), generator=generator)
    text[text == image_token] = 5
    bos = int(getattr(config.get_text_config(), "bos_token_id", None) or 1)
    if prefix_tokens:
        text[:, 0] = bos
    image = torch.full((batch, tokens_per_image), image_token, dtype=torch.long)
    input_ids = torch.cat([text[:, :prefix_tokens], image, text[:, prefix_tokens:]], dim=1)
    length = input_ids.shape[1]
    positions = torch.arange(length).expand(batch, length)
    is_image = input_ids == image_token
    pixel_values = torch.randn(batch, 3, side, side, generator=generator)
    return Workload(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids).to(device),
        pixel_values=pixel_values.to(device=device, dtype=dtype),
        image_positions=positions[is_image].view(batch, -1).to(device),
        text_positions=positions[~is_image].view(batch, -1).to(device),
    )
