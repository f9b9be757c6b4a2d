"""How far a pruned model's next-token distribution is from the unpruned model's, on the same prompt."""

from __future__ import annotations

import torch


def first_token_divergence(
    reference_logits: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) KL(reference || pruned) in nats and (B,) whether the two top-1 tokens agree, from (B, V) logits.

    KL is taken from the reference (the unpruned model) to the pruned one: the expected extra surprise of the
    pruned model on what the unpruned model would say. In float64; identical logits give exactly 0 (rounding
    below 0 is clipped: KL is never negative)."""
    if reference_logits.shape != logits.shape:
        raise ValueError(
            f"logits of one shape are needed, got {tuple(reference_logits.shape)} and {tuple(logits.shape)}"
        )
    reference = reference_logits.double().log_softmax(dim=-1)
    pruned = logits.double().log_softmax(dim=-1)
    probability = reference.exp()
    terms = torch.where(probability > 0, probability * (reference - pruned), torch.zeros_like(probability))
    kl = terms.sum(dim=-1).clamp(min=0.0)
    agree = reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)
    return kl, agree
