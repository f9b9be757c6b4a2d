"""Small helpers shared by the metric classes: batch checks and reading "cat" states safely."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.utilities import dim_zero_cat


def check_batch(predictions: Sequence[str], answers: Sequence[Sequence[str]], **columns: object) -> None:
    """Raise if the per-sample columns of one `update` call do not all have one length.

    A silent `zip` over columns of different lengths would drop samples and bias the score.
    """
    if isinstance(predictions, str):
        raise TypeError("predictions must be a list of strings (one per sample), not a single string")
    lengths = {"predictions": len(predictions), "answers": len(answers)}
    lengths.update({name: len(value) for name, value in columns.items() if value is not None})  # type: ignore[arg-type]
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every column needs one entry per sample, got lengths {lengths}")
    for i, refs in enumerate(answers):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"answers[{i}] must be a non-empty list of reference strings, got {refs!r}")


def cat_state(state: torch.Tensor | list[torch.Tensor], dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A "cat" state as one tensor (it is a list before synchronisation, a tensor after); empty if unused."""
    if isinstance(state, list):
        if not state:
            return torch.zeros(0, dtype=dtype)
        state = dim_zero_cat(state)
    return state.to(dtype)


class IntegerCatStates:
    """Mixin for metrics whose "cat" states all hold integers (ids, hashes, flags).

    Before gathering, torchmetrics gives a rank that never called `update` an empty placeholder of
    `metric.dtype` (float32 by default), while the other ranks send int64: the all-gather then mixes dtypes
    across ranks, which gloo aborts on (and a float32 cat would corrupt 64-bit hashes anyway). Reporting
    int64 here makes the placeholder int64, so a rank without samples is harmless.
    """

    @property
    def dtype(self) -> torch.dtype:
        return torch.long
