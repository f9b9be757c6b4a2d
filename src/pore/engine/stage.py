"""One pruning stage at work: what the hook on a stage's first layer does to a prompt and to a decoding step.

For a prompt (`prune_prompt`): the method scores the visual tokens still in the sequence (with what it asked
to see, `pore.engine.observe`), the prior weighs the scores and each image keeps its top budget
(`pore.engine.selection`), the method may recycle (rewrite, merge, replace kept tokens), and the sequence is
cut (`pore.engine.surgery`): the kept hidden states, and the mask and RoPE positions every layer of the stage
gets. For a decoding step (`decoding_inputs`): the stage's layers get the mask of their pruned prompt plus the
new tokens (and, for compact positions, the new tokens' shifted positions).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from pore import compat
from pore.adapters import ModelAdapter
from pore.engine.observe import Observer
from pore.engine.record import PruningRecord
from pore.engine.rerank import RerankState
from pore.engine.selection import ImageSizes, padding_weights, select, weighted_scores
from pore.engine.state import HookState, Prefill, PrunedLayerInputs, PrunedPrompt
from pore.engine.surgery import (
    Cut,
    compact_decoding_positions,
    compact_positions,
    cut_sequence,
    decoding_padding,
    gather_sequence,
    kept_blocks,
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
        # FastV's official mask implementation (`pore.engine.rerank`): a key mask re-chosen at every token.
        self.rerank = getattr(method, "rerank", "prefill") == "every_token"
        if self.rerank:
            self._check_rerank(adapter)
        config = adapter.language_model().config
        count = len(adapter.decoder_layers())
        # Each decoder layer's kind (full / sliding-window attention): the language model hands every layer
        # the mask and RoPE of its kind, and so do the pruned layers.
        self.layer_types = [compat.layer_type(config, index) for index in range(count)]
        self.pruned_types = sorted(set(self.layer_types[self.stages[0].layer :]))
        # Whether the kinds have RoPEs of their own: the rotary embedding then takes the kind (Gemma 3's
        # local and global bases); otherwise every kind shares one (a Qwen2 with sliding-window layers).
        rotary = getattr(adapter.language_model(), "rotary_emb", None)
        self._rope_per_kind = (
            rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        )
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
        not_padding = self._not_padding(stage, inputs, sizes)
        kept_visual, weighted = self._select(stage, inputs, not_padding)
        hidden, kept_visual = self.method.recycle(inputs, hidden, kept_visual, weighted)
        if bool((kept_visual & ~prefill.alive).any()):
            raise RuntimeError(
                f"{type(self.method).__name__}.recycle kept visual tokens that are no longer there"
            )
        rerank = None
        if self.rerank:  # every token stays in the sequence; the dropped ones are hidden as keys
            rerank = RerankState(inputs.layout, inputs.candidates(), prefill.input_ids, prefill.padding_mask)
            rerank.not_padding, rerank.history = not_padding, [kept_visual]
        cut_keep = prefill.alive if rerank else kept_visual
        cut = cut_sequence(prefill.current_padding, prefill.alive, prefill.position, cut_keep)
        if rerank is not None:
            cut = dataclasses.replace(cut, padding=rerank.hidden_keys(kept_visual))
        pruned_hidden = gather_sequence(hidden, cut.order, seq_dim=1)  # (B, L', D)
        # Later stages gather positions from what the previous stage handed its layers.
        previous = forward.layer_inputs if stage > 0 else None
        position_embeddings, position_ids = self._kept_positions(
            prefill, kwargs, previous, pruned_hidden, cut
        )
        cache = compat.cache_from(kwargs)
        prefill.block_ids = kept_blocks(prefill.block_ids, cut)
        masks = self._masks(stage, pruned_hidden, cut.padding, cache, prefill.block_ids, prefill=True)
        forward.layer_inputs = PrunedLayerInputs(masks, position_embeddings, position_ids)
        self._advance(stage, prefill, cut, kept_visual, weighted)
        if stage == 0:
            state.prompt = PrunedPrompt(prefill.input_ids.shape[1], cache, rerank=rerank)
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

    def _not_padding(
        self, stage: int, inputs: ScoringInputs, sizes: ImageSizes | None
    ) -> torch.Tensor | None:
        """(B, N) 1 = not padding, 0 = padding, when this stage suppresses padding (else None)."""
        settings, prior = self.stages[stage], self.strategy.prior
        cut_to_unpadded = prior.suppress_padding and prior.budget_from_unpadded
        if prior.suppress_padding and (settings.reweight or cut_to_unpadded):
            return padding_weights(inputs.layout, sizes, prior.pad_threshold, prior.pad_rule)
        return None

    def _select(
        self, stage: int, inputs: ScoringInputs, not_padding: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which visual tokens survive this stage: (B, N) bool, and the (B, N) weighted scores ranked."""
        layout, settings, prior = inputs.layout, self.stages[stage], self.strategy.prior
        scores = self.method.score(inputs)
        inputs.method_scores = scores  # recycle may rank by the unweighted scores (SparseVLM's official code)
        # The PoRe authors' FastV: only tokens that are not padding compete, and the budget is cut to their
        # number (at every stage, so that a later stage never asks for the padding dropped here).
        cut_to_unpadded = prior.suppress_padding and prior.budget_from_unpadded
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
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """(cos, sin) per layer kind and position ids of the kept slots, per `strategy.positions`; `previous`:
        what the previous stage handed its layers (None at the first stage: the language model's own
        arguments)."""
        language_model = self.adapter.language_model()
        flash = uses_flash_attention(language_model.config)
        if self.positions == "compact":
            positions = compact_positions(
                prefill.current_positions, kwargs.get("position_ids"), prefill.current_padding, cut
            )
            prefill.current_positions = positions
            # FlashAttention reads position ids that restart as packed sequences; the mask says it all.
            return self._rotary(pruned_hidden, positions), (None if flash else positions)
        if previous is not None:
            embeddings, kept_ids, ids = {}, None, previous.position_ids
            for kind, value in previous.position_embeddings.items():
                embeddings[kind], kept_ids = original_positions(cut.order, value, ids, flash)
            return embeddings, kept_ids
        position_ids = kwargs.get("position_ids")
        own, kept_ids = original_positions(cut.order, kwargs["position_embeddings"], position_ids, flash)
        if not self._rope_per_kind:  # one RoPE for every kind of layer (also M-RoPE): the gathered one
            return {kind: own for kind in self.pruned_types}, kept_ids
        embeddings = {self.layer_types[self.stages[0].layer]: own}
        others = [kind for kind in self.pruned_types if kind not in embeddings]
        if others:
            # Layers of another kind use another RoPE (Gemma 3: local and global bases): computed by the
            # language model's rotary embedding at the kept tokens' original positions.
            if position_ids is None or position_ids.dim() != 2:
                raise NotImplementedError(
                    "pruning a language model whose layer kinds use different RoPE needs the 1-D position "
                    "ids (batch, length) it hands its decoder layers"
                )
            kept = gather_sequence(position_ids, cut.order, seq_dim=1)  # (B, L')
            embeddings.update(self._rotary(pruned_hidden, kept, others))
        return embeddings, kept_ids

    def _rotary(
        self, hidden: torch.Tensor, positions: torch.Tensor, kinds: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """(cos, sin) of `positions` (B, L) per layer kind, from the language model's own rotary embedding
        (which takes the kind when kinds differ in RoPE, Gemma 3)."""
        rotary = self.adapter.language_model().rotary_emb
        kinds = self.pruned_types if kinds is None else kinds
        if not self._rope_per_kind:
            shared = rotary(hidden, positions)
            return dict.fromkeys(kinds, shared)
        return {kind: rotary(hidden, positions, kind) for kind in kinds}

    def decoding_inputs(
        self, stage: int, state: HookState, hidden: torch.Tensor, kwargs: dict
    ) -> PrunedLayerInputs:
        """Mask (and compact positions) for a stage's layers at a decoding step: its pruned prompt mask + the
        new tokens' mask."""
        prompt, layer = state.prompt, self.stages[stage].layer
        cache = compat.cache_from(kwargs)
        stage_padding = prompt.stage_padding[stage]  # (B, L_s) the stage's prompt
        if prompt.rerank is not None:  # FastV's official mask: this token's ranking hides other image tokens
            stage_padding = self._rerank_step(prompt.rerank, state.forward.decoding_rows)
        padding = decoding_padding(
            stage_padding,
            state.forward.padding_mask,
            prompt.prompt_length,
            cache,
            layer,
            hidden,
        )
        # The new tokens are text: no bidirectional block reaches them.
        masks = self._masks(stage, hidden, padding, cache, None, prefill=False)
        if self.positions == "compact":
            positions = compact_decoding_positions(
                kwargs.get("position_ids"), prompt.stage_removed[stage], hidden.shape[0]
            )
            return PrunedLayerInputs(masks, self._rotary(hidden, positions), positions)
        return PrunedLayerInputs(masks, None, kwargs.get("position_ids"))

    def _rerank_step(self, rerank: RerankState, rows: torch.Tensor | None) -> torch.Tensor:
        """(B, L) the prompt's visible keys for this decoding step: the image tokens re-selected by the new
        token's attention in layer K-1 (`rows` (B, L_total)), with the prompt's prior, padding and budget."""
        if rows is None:
            raise RuntimeError("re-ranking: no layer K-1 attention was captured at this decoding step")
        inputs = ScoringInputs(
            layout=rerank.layout,
            alive=rerank.layout.valid,
            input_ids=rerank.input_ids,
            attention_mask=rerank.real,
            budget=self.stages[0].budget,
            last_token_attention=rows,
        )
        kept, _ = self._select(0, inputs, rerank.not_padding)
        rerank.history.append(kept)
        return rerank.hidden_keys(kept)

    def _check_rerank(self, adapter: ModelAdapter) -> None:
        """The official re-ranking masks keys of one FastV stage at the tokens' original positions."""
        if len(self.stages) != 1 or self.positions != "original":
            raise ValueError(
                "strategy.options.rerank=every_token (FastV's mask implementation) needs one pruning stage "
                f"and strategy.positions=original (or official); got {len(self.stages)} stages, "
                f"{self.positions}"
            )
        if uses_flash_attention(adapter.language_model().config):
            raise ValueError(
                "strategy.options.rerank=every_token hides the dropped image tokens as keys, which "
                "FlashAttention's padding mask cannot express (it drops them as queries too); use "
                "attn_implementation sdpa or eager"
            )

    def _masks(
        self,
        stage: int,
        hidden: torch.Tensor,
        padding: torch.Tensor,
        cache: Any,
        block_ids: torch.Tensor | None,
        prefill: bool,
    ) -> dict[str, Any]:
        """The mask of each kind of layer in `stage`'s layers, built for the first layer of that kind there
        (its cache says how many tokens it holds: a sliding-window layer keeps only its window). For a
        `prefill`, also for the kinds that first appear after the stage: the next stage's layer may run its
        attention on this stage's sequence before it cuts (PyramidDrop's own-layer scores), and no layer from
        K on has cached anything yet."""
        end = self.stages[stage + 1].layer if stage + 1 < len(self.stages) else len(self.layer_types)
        if prefill:
            end = len(self.layer_types)
        first_of_kind: dict[str, int] = {}
        for index in range(self.stages[stage].layer, end):  # ascending: the stage's own layers first
            first_of_kind.setdefault(self.layer_types[index], index)
        config = self.adapter.language_model().config
        blocks = self.adapter.bidirectional_layer_types  # the kinds whose mask has the image blocks
        return {
            kind: pruned_mask(config, hidden, padding, cache, index, block_ids if kind in blocks else None)
            for kind, index in first_of_kind.items()
        }
