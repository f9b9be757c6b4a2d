"""`fidelity=true`: the unpruned model's first-token distribution on each batch, beside the pruned one's.

One extra forward per batch: the pruner is detached (the model is exactly the unpruned one), `generate`
makes one token and returns its raw logits, and the pruner is attached again before the timed, pruned
`generate`. The same `generate` call builds both forwards (positions from the attention mask, left padding),
so with nothing pruned the two distributions are the same computation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pore.app.evaluation.uncertainty import KL_COLUMN, TOP1_COLUMN
from pore.engine import Pruner
from pore.stats.divergence import first_token_divergence


def unpruned_first_token_logits(
    model: nn.Module, pruner: Pruner | None, inputs: dict[str, torch.Tensor], pad_token_id: int | None
) -> torch.Tensor:
    """(B, V) raw logits of the first generated token with the pruner detached (and re-attached after)."""
    attached = pruner is not None and pruner.attached
    if attached:
        pruner.detach()
    try:
        output = model.generate(
            **inputs,
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        if attached:
            pruner.attach()
    return output.logits[0].float()


def first_token_columns(reference_logits: torch.Tensor, logits: torch.Tensor) -> list[dict[str, Any]]:
    """Per sample, the predictions.jsonl columns: `first_token_kl` (nats) and `first_token_top1` (bool)."""
    kl, agree = first_token_divergence(reference_logits, logits.float())
    return [
        {KL_COLUMN: float(k), TOP1_COLUMN: bool(a)} for k, a in zip(kl.tolist(), agree.tolist(), strict=True)
    ]
