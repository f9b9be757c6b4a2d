"""One pruning stage at work: what the hook on a stage's first layer does to a prompt and to a decoding step.

For a prompt (`prune_prompt`): the method scores the visual tokens still in the sequence (with what it asked
to see, `pore.engine.observe`), the prior weighs the scores and each image keeps its top budget
(`pore.engine.selection`), the method may recycle (rewrite, merge, replace kept tokens), and the sequence is
cut (`pore.engine.surgery`): the kept hidden states, and the mask and RoPE positions every layer of the stage
gets. For a decoding step (`decoding_inputs`): the stage's layers get the mask of their pruned prompt plus the
new tokens (and, for compact positions, the new tokens' shifted positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pore import compat
from pore.adapters import ModelAdapter
from pore.engine.observe import Observer
from pore.engine.record import PruningRecord
from pore.engine.selection import ImageSizes, padding_weights, select, weighted_scores
from pore.engine.state import HookState, Prefill, PrunedLayerInputs, PrunedPrompt
from pore.engine.surgery import (
    Cut,
    compact_decoding_positions,
    compact_positions,
    cut_sequence,
    decoding_padding,
    gather_sequence,
    moved_positions,
    original_positions,
    pruned_mask,
    uses_flash_attention,
)
from pore.methods import PruningMethod, ScoringInputs
from pore.strategy import PruningStage, Strategy


class StageRunner:
    """Runs the stages of a resolved `strategy` with `method` on the model of `adapter`."""

    def __init__(
        self, adapter: ModelAdapter, strategy: Strategy, method: PruningMethod, observer: Observer
    ) -> None:
        self.adapter = adapter
        self.strategy = strategy
        self.stages: Sequence[PruningStage] = strategy.stages()
        self.method = method
        self.observer = observer
        self.positions = strategy.positions
        self.texts: list[str] | None = None  # the next prefill's instruction texts (`Pruner.set_texts`)

    def prune_prompt(
        self, stage: int, state: HookState, hidden: torch.Tensor, kwargs: dict, sizes: ImageSizes | None
    ) -> tuple[torch.Tensor, PruningRecord | None]:
        """Drop the unselected visual tokens from the stage layer's inputs (`hidden` (B, L_cur, D), `kwargs`);
        returns the kept hidden states (B, L', D), and after the last stage the prefill's record. `sizes`: the
        images' original sizes (padding suppression)."""
        forward = state.forward
        prefill = forward.prefill
        if prefill.stage != stage:
            raise RuntimeError(f"pruning stage {stage} ran before stage {prefill.stage}")
        inputs = self.observer.scoring_inputs(prefill, stage, self.stages[stage].budget)
        inputs.texts = self.texts
        kept_visual, weighted = self._select(stage, inputs, sizes)
        hidden, kept_visual = self.method.recycle(inputs, hidden, kept_visual, weighted)
        if bool((kept_visual & ~prefill.alive).any()):
            raise RuntimeError(
                f"{type(self.method).__name__}.recycle kept visual tokens that are no longer there"
            )
        cut = cut_sequence(prefill.current_padding, prefill.alive, prefill.position, kept_visual)
        pruned_hidden = gather_sequence(hidden, cut.order, seq_dim=1)  # (B, L', D)
        # Later stages gather positions from what the previous stage handed its layers.
        previous = forward.layer_inputs if stage > 0 else None
        position_embeddings, position_ids = self._kept_positions(
            prefill, kwargs, previous, pruned_hidden, cut
        )
        cache = compat.cache_from(kwargs)
        mask = self._mask(pruned_hidden, cut.padding, cache, self.stages[stage].layer)
        forward.layer_inputs = PrunedLayerInputs(mask, position_embeddings, position_ids)
        self._advance(stage, prefill, cut, kept_visual, weighted)
        if stage == 0:
            state.prompt = PrunedPrompt(prefill.input_ids.shape[1], cache)
        state.prompt.stage_padding.append(cut.padding)
        removed = prefill.padding_mask.sum(dim=1) - cut.padding.sum(dim=1)  # (B,) real tokens removed
        state.prompt.stage_removed.append(removed)
        if stage < len(self.stages) - 1:
            return pruned_hidden, None
        num_layers = len(self.adapter.decoder_layers())
        layers = [settings.layer for settings in self.stages]
        record = PruningRecord.from_stages(
            prefill.layout, prefill.padding_mask, num_layers, layers, prefill.stage_kept, prefill.stage_scores
        )
        return pruned_hidden, record

    def _select(
        self, stage: int, inputs: ScoringInputs, sizes: ImageSizes | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which visual tokens survive this stage: (B, N) bool, and the (B, N) weighted scores ranked."""
        layout, settings, prior = inputs.layout, self.stages[stage], self.strategy.prior
        scores = self.method.score(inputs)
        # The PoRe authors' FastV: only tokens that are not padding compete, and the budget is cut to their
        # number (at every stage, so that a later stage never asks for the padding dropped here).
        cut_to_unpadded = prior.suppress_padding and prior.budget_from_unpadded
        not_padding = None  # (B, N) 1 = not padding, 0 = padding (when padding suppression is on)
        if prior.suppress_padding and (settings.reweight or cut_to_unpadded):
            not_padding = padding_weights(layout, sizes, prior.pad_threshold)
        weighted = weighted_scores(scores, layout, prior, settings.reweight, not_padding)  # (B, N)
        unpadded = (not_padding > 0).to(weighted.device) if cut_to_unpadded else None
        return select(self.stages, stage, weighted, layout, inputs.candidates(), unpadded), weighted

    @staticmethod
    def _advance(stage: int, prefill: Prefill, cut: Cut, kept: torch.Tensor, weighted: torch.Tensor) -> None:
        """The prefill's bookkeeping after `stage` cut the sequence, keeping the visual tokens `kept`."""
        prefill.position = moved_positions(cut, kept, prefill.position)
        prefill.alive = kept
        prefill.origin = prefill.origin.gather(1, cut.order)
        prefill.current_padding = cut.padding
        prefill.stage_kept.append(kept)
        prefill.stage_scores.append(weighted)
        prefill.stage = stage + 1
        prefill.stage_captures = {}

    def _kept_positions(
        self,
        prefill: Prefill,
        kwargs: dict,
        previous: PrunedLayerInputs | None,
        pruned_hidden: torch.Tensor,
        cut: Cut,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """(cos, sin) and position ids of the kept slots, per `strategy.positions`; `previous`: what the
        previous stage handed its layers (None at the first stage: the language model's own arguments)."""
        language_model = self.adapter.language_model()
        flash = uses_flash_attention(language_model.config)
        if self.positions == "compact":
            positions = compact_positions(
                prefill.current_positions, kwargs.get("position_ids"), prefill.current_padding, cut
            )
            prefill.current_positions = positions
            # FlashAttention reads position ids that restart as packed sequences; the mask says it all.
            return language_model.rotary_emb(pruned_hidden, positions), (None if flash else positions)
        if previous is not None:
            return original_positions(cut.order, previous.position_embeddings, previous.position_ids, flash)
        return original_positions(cut.order, kwargs["position_embeddings"], kwargs.get("position_ids"), flash)

    def decoding_inputs(
        self, stage: int, state: HookState, hidden: torch.Tensor, kwargs: dict
    ) -> PrunedLayerInputs:
        """Mask (and compact positions) for a stage's layers at a decoding step: its pruned prompt mask + the
        new tokens' mask."""
        prompt, layer = state.prompt, self.stages[stage].layer
        cache = compat.cache_from(kwargs)
        padding = decoding_padding(
            prompt.stage_padding[stage],
            state.forward.padding_mask,
            prompt.prompt_length,
            cache,
            layer,
            hidden,
        )
        mask = self._mask(hidden, padding, cache, layer)
        if self.positions == "compact":
            positions = compact_decoding_positions(
                kwargs.get("position_ids"), prompt.stage_removed[stage], hidden.shape[0]
            )
            return PrunedLayerInputs(
                mask, self.adapter.language_model().rotary_emb(hidden, positions), positions
            )
        return PrunedLayerInputs(mask, None, kwargs.get("position_ids"))

    def _mask(self, hidden: torch.Tensor, padding: torch.Tensor, cache: Any, layer: int) -> Any:
        return pruned_mask(self.adapter.language_model().config, hidden, padding, cache, layer)
