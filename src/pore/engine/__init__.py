"""The pruning engine and what it reports.

- `pruner`: the `Pruner` (lifecycle and hooks) and the hooks' contract;
- `state`: what the hooks hand each other (one object per forward, prefill, decoding);
- `observe`: what a method asked to see (`pore.methods.requests`), captured and delivered per token;
- `stage`: one pruning stage at work on a prompt (score, select, recycle, cut) and on a decoding step;
- `tap`: the attention tap shared with calibration (query / key states inside SDPA, FlashAttention, eager);
- `selection`: score x prior, per-image top-k, budgets;
- `surgery`: removing tokens from the sequence, masks and positions of the shorter one;
- `record`: what a prefill did (`PruningRecord`).
"""

from pore.engine.pruner import Pruner
from pore.engine.record import PruningRecord
from pore.engine.surgery import gather_sequence

__all__ = ["Pruner", "PruningRecord", "gather_sequence"]
