"""Sequence surgery: take tokens out of a sequence and give the shorter one its masks and positions.

A stage keeps every text token and the visual tokens it chose. The kept slots of each sample are gathered
in their order and right-aligned (prompts are left-padded); a sample that keeps fewer slots than the longest
is left-filled with dropped slots that are masked out like left padding. Kept tokens keep their RoPE
positions (`original_positions`), or the kept sequence is renumbered so that each token's position drops by
the real tokens removed before it (`compact_positions`; decoding steps then continue from the compacted
length, `compact_decoding_positions`). Masks are the language model's own causal + padding masks built for
the shorter sequence (`pruned_mask`), prompt and decoding steps alike (`decoding_padding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from pore import compat


def gather_sequence(tensor: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather `index` (B, L') along `seq_dim` of `tensor`, whose batch dim (just before it) may be 1."""
    batch_dim = seq_dim - 1
    shape = list(tensor.shape)
    shape[batch_dim] = index.shape[0]
    tensor = tensor.expand(*shape)
    view = [1] * tensor.dim()
    view[batch_dim], view[seq_dim] = index.shape
    full_index = index.view(view).expand(*shape[:seq_dim], index.shape[1], *shape[seq_dim + 1 :])
    return tensor.gather(seq_dim, full_index)


@dataclass
class Cut:
    """How one stage shortens the current sequence (B, L_cur) to (B, L')."""

    keep: torch.Tensor  # (B, L_cur) bool: the current slots that survive
    order: torch.Tensor  # (B, L') long: the current slot each new slot comes from (right-aligned)
    padding: torch.Tensor  # (B, L') bool: real tokens of the new sequence

    @property
    def length(self) -> int:
        return self.order.shape[1]


def cut_sequence(
    current_padding: torch.Tensor, alive: torch.Tensor, position: torch.Tensor, kept: torch.Tensor
) -> Cut:
    """Drop the visual tokens that are `alive` (B, N) but not `kept` (B, N) from a sequence whose real
    tokens are `current_padding` (B, L_cur); `position` (B, N): where each visual token sits in it."""
    batch, length = current_padding.shape
    dropped = alive & ~kept  # (B, N)
    keep = torch.ones(batch, length + 1, dtype=torch.bool, device=current_padding.device)
    keep.scatter_(1, torch.where(dropped, position, length), False)  # dropped slots; the rest to a spare
    keep = keep[:, :length]
    pruned_length = int(keep.sum(dim=1).max())
    # Kept positions in order, right-aligned; samples that keep fewer tokens are left-filled with dropped
    # positions that are masked out like left padding (only when images per sample differ).
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, length - pruned_length :]  # (B, L')
    padding = current_padding.gather(1, order) & keep.gather(1, order)  # (B, L')
    return Cut(keep, order, padding)


def moved_positions(cut: Cut, kept: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(B, N) long: where the `kept` (B, N) visual tokens sit after `cut` (their rank among the kept slots,
    shifted by the left fill); 0 for the others. `position` (B, N): where they sat before it."""
    kept_count = cut.keep.sum(dim=1, keepdim=True)  # (B, 1): sample b's kept tokens fill its last slots
    new_position = torch.cumsum(cut.keep.long(), dim=1) - 1 + (cut.length - kept_count)  # (B, L_cur)
    return torch.where(kept, new_position.gather(1, position), 0)


def original_positions(
    order: torch.Tensor, position_embeddings: Any, position_ids: torch.Tensor | None, flash: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """(cos, sin) and position ids of the kept slots `order` (B, L'), each token keeping its RoPE position:
    gathered from what the layers received for the current sequence."""
    cos, sin = position_embeddings
    gathered = (
        gather_sequence(cos, order, seq_dim=cos.dim() - 2),
        gather_sequence(sin, order, seq_dim=sin.dim() - 2),
    )
    if position_ids is None or flash:
        # FlashAttention reads non-contiguous position ids as packed sequences; the mask says it all.
        return gathered, None
    return gathered, gather_sequence(position_ids, order, seq_dim=position_ids.dim() - 1)


def compact_positions(
    current_positions: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    current_padding: torch.Tensor,
    cut: Cut,
) -> torch.Tensor:
    """(B, L') long: positions of the kept slots when the kept sequence is renumbered: each kept token's
    position drops by the number of real tokens the cut removes before it. `current_positions` (B, L_cur):
    those of the current sequence after an earlier compacting stage (None: the language model's
    `position_ids`, which it hands every layer)."""
    current = current_positions
    if current is None:
        if position_ids is None or position_ids.dim() != 2:
            raise NotImplementedError(
                "strategy.positions=compact needs the language model to hand its decoder layers 1-D "
                "position ids (batch, length); use strategy.positions=original"
            )
        current = position_ids.expand(cut.keep.shape[0], -1)
    removed = current_padding & ~cut.keep  # (B, L_cur) real tokens this cut drops
    removed_before = torch.cumsum(removed.long(), dim=1).gather(1, cut.order)  # (B, L')
    return current.gather(1, cut.order) - removed_before


def compact_decoding_positions(
    position_ids: torch.Tensor | None, removed: torch.Tensor, batch: int
) -> torch.Tensor:
    """(B, T) long: positions of a decoding step's new tokens in a compacted stage: their position in the
    full layers (`position_ids`) minus the real prompt tokens the stages so far `removed` (B,)."""
    if position_ids is None or position_ids.dim() != 2:
        raise NotImplementedError(
            "strategy.positions=compact needs 1-D position ids at decoding steps; use "
            "strategy.positions=original"
        )
    return position_ids.expand(batch, -1) - removed.to(position_ids.device)[:, None]


def decoding_padding(
    prompt_padding: torch.Tensor,
    full_mask: torch.Tensor | None,
    prompt_length: int,
    cache: Cache,
    layer: int,
    hidden: torch.Tensor,
) -> torch.Tensor:
    """(B, L_s + T) bool: real tokens a pruned stage's layers attend to at a decoding step: the stage's pruned
    prompt (`prompt_padding` (B, L_s)), then the new tokens (`full_mask` past the prompt's `prompt_length`,
    the language model's 2-D mask; None: all real)."""
    if full_mask is None:
        # The layer has not cached this step's tokens yet: it will hold its past plus the new queries.
        kv_length = cache.get_seq_length(layer) + hidden.shape[1]
        new_tokens = kv_length - prompt_padding.shape[1]
        new_mask = torch.ones(hidden.shape[0], new_tokens, dtype=torch.bool, device=hidden.device)
    else:
        new_mask = full_mask[:, prompt_length:].bool()
    return torch.cat([prompt_padding, new_mask], dim=1)


def pruned_mask(
    config: Any,
    hidden: torch.Tensor,
    padding: torch.Tensor,
    cache: Cache | None,
    layer: int,
    block_ids: torch.Tensor | None = None,
) -> Any:
    """The causal + padding mask of pruned layer `layer` (full or sliding window, by its kind), in the format
    of the language model's attention backend (`config` its config; `padding` (B, L_kv) bool the real tokens
    it attends to; `block_ids` (B, L_kv) long the bidirectional blocks among them, or None)."""
    return compat.causal_mask(config, hidden, padding, cache, layer, block_ids)


def kept_blocks(block_ids: torch.Tensor | None, cut: Cut) -> torch.Tensor | None:
    """(B, L') long: the bidirectional block of each kept slot (-1 for the masked left fill), or None."""
    if block_ids is None:
        return None
    return torch.where(cut.padding, block_ids.gather(1, cut.order), -1)


def uses_flash_attention(config: Any) -> bool:
    return "flash" in (config._attn_implementation or "")
