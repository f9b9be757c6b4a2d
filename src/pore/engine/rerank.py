"""FastV's official mask implementation: image tokens re-ranked at every generated token.

The official FastV code (pkunlp-icler/FastV, modeling_llama.py, the `elif USE_FAST_V` branch: the
implementation its evaluation scripts and the PoRe authors' patch run, with `use_cache=True`) never removes a
token. At every forward, the prompt's and each decoding step's, it ranks the image tokens by the attention
the last token pays them in layer K-1 and hides the ones outside the top-k from the keys of layers K and
later (an attention mask); the KV cache of those layers keeps every token, as computed under the mask of the
step that cached it. The engine's default instead removes the dropped tokens once, at the prompt (FastV's
in-place implementation and most re-implementations).

`strategy.options.rerank=every_token` runs the official behaviour: at the prompt the stage keeps the whole
sequence and hides the dropped image tokens as keys (a 2-D key mask, like padding), and at each decoding step
the new token's attention in layer K-1 (captured by the observer) re-selects the kept image tokens with the
same prior, padding suppression and budget; the stage's layers then see the prompt with the newly dropped
ones hidden. What each step kept is in `RerankState.history`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pore.adapters import VisualLayout


@dataclass
class RerankState:
    """What the decoding steps of a re-ranking stage need from its prompt."""

    layout: VisualLayout  # (B, N) the prompt's visual tokens, positions in the prompt (= the cache's)
    candidates: torch.Tensor  # (B, N) bool: the tokens the stage ranks
    input_ids: torch.Tensor  # (B, L) the prompt
    real: torch.Tensor  # (B, L) bool: the prompt's real tokens
    not_padding: torch.Tensor | None = None  # (B, N) float64 padding suppression's weights, or None
    history: list[torch.Tensor] = field(default_factory=list)  # (B, N) bool kept, per forward (prompt first)

    def hidden_keys(self, kept: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the prompt's real tokens without the candidates that `kept` (B, N) drops."""
        dropped = self.candidates & ~kept  # (B, N)
        visible = self.real.clone()
        length = visible.shape[1]
        # Dropped tokens' slots become False; the others scatter to a spare column that is cut off.
        spare = torch.ones(visible.shape[0], length + 1, dtype=torch.bool, device=visible.device)
        spare.scatter_(1, torch.where(dropped, self.layout.seq_index, length).to(visible.device), False)
        return visible & spare[:, :length]


def kept_raster(layout: VisualLayout, kept: torch.Tensor) -> list[list[list[int]]]:
    """Per sample, per image: the sorted raster ids of the `kept` (B, N) tokens."""
    result = []
    for b in range(kept.shape[0]):
        images = int(layout.images_per_sample[b])
        sample = []
        for image in range(images):
            chosen = kept[b] & layout.valid[b] & (layout.image_index[b] == image)
            sample.append(sorted(layout.raster[b][chosen].tolist()))
        result.append(sample)
    return result
