"""Features a language model adds to some tokens after its first decoder layers, carried through pruning.

Qwen3-VL's DeepStack hands its language model, besides the merged embeddings, the image tokens' positions
(`visual_pos_masks`, (B, L)) and one set of vision features per early decoder layer
(`deepstack_visual_embeds[i]`, (M, D): a row per visual position, batch-major); after decoder layer i the
language model adds row j to the hidden state of the j-th visual position. Once a stage has removed tokens,
that (B, L) mask no longer fits the shorter sequence, and the dropped tokens' features must not go anywhere.

So while a pruner is attached, the language model's pre-hook takes the features out of its arguments
(`ModelAdapter.take_layer_features`), and a forward hook on each decoder layer adds them here, to the tokens
still in the sequence: slot s of the current sequence came from prompt position `origin[b, s]` (the prefill's
bookkeeping), which is the r-th visual position of the batch, so it receives row r of the layer's features.
Slots that are not real tokens (left padding, the left fill of samples that kept fewer tokens) receive
nothing. With nothing pruned this is the model's own addition, element for element.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pore.engine.state import HookState


class LayerFeatureAdder:
    """Adds a prompt's layer features to the tokens that survive pruning, for the pruner that owns `state`."""

    def __init__(self, state: HookState) -> None:
        self.state = state

    def attach(self, layers: nn.ModuleList) -> list[Any]:
        """Forward hooks on every decoder layer (a prompt says how many of them receive features)."""
        return [
            layer.register_forward_hook(lambda _module, _args, output, i=index: self._after_layer(i, output))
            for index, layer in enumerate(layers)
        ]

    def _after_layer(self, index: int, output: Any) -> Any:
        forward = self.state.forward
        given = forward.layer_features if forward is not None else None
        if given is None or index >= len(given.features):
            return None
        prefill = forward.prefill
        if prefill is None:
            raise NotImplementedError("layer features (DeepStack) at a decoding step are not supported")
        hidden = output[0] if isinstance(output, tuple) else output  # (B, L_cur, D)
        row = given.row.to(hidden.device).gather(1, prefill.origin)  # (B, L_cur)
        receives = (row >= 0) & prefill.current_padding.to(hidden.device)  # (B, L_cur)
        features = given.features[index].to(hidden.device, hidden.dtype)  # (M, D)
        hidden = hidden.clone()
        hidden[receives, :] = hidden[receives, :] + features[row[receives]]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
