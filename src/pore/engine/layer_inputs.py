"""What else a pruned decoder layer receives per token: per-token arguments, and only its last queries.

Two things a language model may hand its decoder layers that the pruned masks and RoPE do not cover:

- a per-token tensor besides the hidden states (Gemma 4's per-layer input embeddings: layer i receives
  `per_layer_inputs[:, :, i, :]`, (B, L, D_ple), sliced by the language model from a tensor it computed for
  the whole prompt before its layers). The adapter names the argument (`per_token_layer_argument`); after
  a pruning stage the engine gathers it at the kept slots (slot s of the current sequence came from prompt
  position `Prefill.origin[b, s]`), as it gathers the hidden states;
- hidden states of the last Q tokens only (Gemma 4 at a prefill with an integer `logits_to_keep`: its
  KV-shared layers write no cache, so it runs them on the tokens whose logits are kept, slicing the masks and
  (cos, sin) it hands them). The engine slices its pruned masks and (cos, sin) the same way; the last Q slots
  of the pruned sequence are the prompt's last Q tokens (the kept sequence is right-aligned, text included).

At decoding steps every argument already covers the new tokens only: nothing changes.
"""

from __future__ import annotations

from typing import Any

import torch

from pore.adapters import ModelAdapter
from pore.engine.state import Prefill
from pore.engine.surgery import gather_sequence


def layer_per_token_inputs(
    adapter: ModelAdapter, prefill: Prefill, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """A pruned layer's (args, kwargs) at a prefill with its per-token argument gathered at the kept slots,
    and its mask and (cos, sin) cut to the queries it runs on."""
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, Q, D)
    queries = hidden.shape[1]
    if queries < prefill.origin.shape[1]:
        kwargs = last_queries(kwargs, queries)
    where = adapter.per_token_layer_argument
    if where is None:
        return args, kwargs
    index, name = where
    if len(args) > index and args[index] is not None:
        value = kept_per_token(args[index], prefill, queries)
        return (*args[:index], value, *args[index + 1 :]), kwargs
    if kwargs.get(name) is not None:
        return args, {**kwargs, name: kept_per_token(kwargs[name], prefill, queries)}
    return args, kwargs


def kept_per_token(value: torch.Tensor, prefill: Prefill, queries: int) -> torch.Tensor:
    """(B, Q, ...) the rows of a per-token argument (B, L, ...) of the whole prompt at the last `queries`
    slots of the current sequence; an argument the language model already cut to its last Q prompt tokens
    is theirs when those slots hold them."""
    prompt_length = prefill.input_ids.shape[1]
    origin = prefill.origin[:, -queries:].to(value.device)  # (B, Q) prompt position of each query slot
    if value.shape[1] == prompt_length:
        return gather_sequence(value, origin, seq_dim=1)
    if value.shape[1] == queries:
        expected = torch.arange(prompt_length - queries, prompt_length, device=value.device)
        if not bool((origin == expected).all()):
            raise NotImplementedError(
                f"the language model handed a decoder layer its last {queries} tokens, but pruning removed "
                f"some of the prompt's last {queries} tokens (image tokens at the end of the prompt)"
            )
        return value
    raise RuntimeError(
        f"a per-token argument of {value.shape[1]} tokens reached a pruned layer of a {prompt_length}-token "
        f"prompt running {queries} queries"
    )


def last_queries(kwargs: dict, queries: int) -> dict:
    """The layer's kwargs with the mask rows and (cos, sin) of its last `queries` query slots."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = mask[:, :, -queries:, :]
    elif queries > 1:
        # Without a 4-D mask the attention would treat the Q queries as the start of the sequence.
        raise NotImplementedError(
            f"a pruned layer runs its last {queries} queries only, which needs a 4-D attention mask (got "
            f"{type(mask).__name__}); call the model with logits_to_keep=0 or 1, or attn_implementation=eager"
        )
    result: dict[str, Any] = {**kwargs, "attention_mask": mask}
    embeddings = kwargs.get("position_embeddings")
    if embeddings is not None:
        cos, sin = embeddings
        result["position_embeddings"] = (cos[..., -queries:, :], sin[..., -queries:, :])
    return result
