"""DART (Wen et al., EMNLP 2025): keep the image tokens least similar to a few pivots, inside the LLM.

"Duplication matters more than importance": the official rule (ZichenWen1/DART, `get_retained_image_token`
in `llava/model/language_model/modeling_llama_self.py`), before decoder layer K (2):

1. pivots: the `image_pivots` (4) image tokens and the `text_pivots` (4) tokens after the image with the
   largest L1 norm of their layer K-1 keys (after RoPE, heads concatenated);
2. for each pivot in turn, the `per_pivot` image tokens not taken yet (nor image pivots) whose hidden state
   is least cosine-similar to the pivot's, the hidden states being layer K's input through the language
   model's final norm; per_pivot = min(budget, n - image_pivots) // (image_pivots + text_pivots);
3. kept: the image pivots and every token a pivot picked (text pivots are not image tokens and stay anyway).

So the official code keeps image_pivots + (image_pivots + text_pivots) * per_pivot tokens for a budget
(132 for 128): `options.budget=official` (default) keeps that count, `budget=exact` exactly the budget (the
remainder of the division goes one more to the first pivots). The pivots are visited in the order the
official code does (a Python set of their prompt positions). The kept tokens keep their positions
(`position_ids = keep_indexs`, original). No attention map is read, so no prior applies.

`options.pivot`: `key_norm` (official), `hidden_norm` (L1 norm of layer K's input instead of the keys),
`random` (seeded by `strategy.seed`): the pivot choices the paper compares.
"""

from __future__ import annotations

import torch

from pore.adapters.base import VisualLayout
from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.image_groups import ImageGroups, image_groups
from pore.methods.requests import DecoderHiddenStates, DecoderKeys, Request

PIVOTS = ("key_norm", "hidden_norm", "random")
BUDGETS = ("official", "exact")
KEYS = DecoderKeys(offset=-1, sequence=True)  # (B, L_cur, H_kv, d) layer K-1's keys
SIMILARITY_STATES = DecoderHiddenStates(offset=0, sequence=True, final_norm=True)  # (B, L_cur, D)
RAW_STATES = DecoderHiddenStates(offset=0, sequence=True)  # (B, L_cur, D)


def pivot_order(image_positions: list[int], text_positions: list[int]) -> list[int]:
    """Indices into image + text pivots in the order the official code visits them: it iterates a Python
    set built from the image pivots' then the text pivots' prompt positions (each in top-k order)."""
    everything = image_positions + text_positions
    first_index = {position: i for i, position in reversed(list(enumerate(everything)))}
    return [first_index[position] for position in set(everything)]


@METHODS.register("dart")
class DART(PruningMethod):
    official_positions = "original"  # the official code passes position_ids = the kept indices
    prior_use = "none"  # pivots and duplication, not attention: no position bias to correct
    max_stages = 1  # one pruning layer

    def __init__(
        self,
        seed: int = 0,
        image_pivots: int = 4,
        text_pivots: int = 4,
        pivot: str = "key_norm",
        budget: str = "official",
    ) -> None:
        super().__init__(seed)
        if pivot not in PIVOTS:
            raise ValueError(f"dart: unknown options.pivot {pivot!r}; valid values: {', '.join(PIVOTS)}")
        if budget not in BUDGETS:
            raise ValueError(f"dart: unknown options.budget {budget!r}; valid values: {', '.join(BUDGETS)}")
        for name, value in (("image_pivots", image_pivots), ("text_pivots", text_pivots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"dart: options.{name} must be a non-negative integer, got {value!r}")
        if image_pivots + text_pivots == 0:
            raise ValueError("dart: options.image_pivots + options.text_pivots must be at least 1")
        self.image_pivots, self.text_pivots = image_pivots, text_pivots
        self.pivot, self.exact = pivot, budget == "exact"
        self._selected: tuple[int, torch.Tensor] | None = None  # (id of the inputs, (B, N) kept)

    def observations(self) -> tuple[Request, ...]:
        norm_of = {"key_norm": (KEYS,), "hidden_norm": (RAW_STATES,), "random": ()}[self.pivot]
        return (SIMILARITY_STATES, *norm_of)

    def _pivot_norms(self, inputs: ScoringInputs) -> torch.Tensor:
        """(B, L_cur) float: what ranks the pivot candidates."""
        states = inputs[SIMILARITY_STATES]
        if self.pivot == "key_norm":
            return inputs[KEYS].flatten(2).float().abs().sum(-1)  # L1 norm over heads x head size
        if self.pivot == "hidden_norm":
            return inputs[RAW_STATES].float().abs().sum(-1)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(states.shape[:2], generator=generator).to(states.device)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        selected = self.select(inputs)
        self._selected = (id(inputs), selected)
        return selected.double()  # (B, N): the official set first; `recycle` keeps exactly it

    def recycle(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the official set (its count may differ from the engine's budget, `options.budget`)."""
        if self._selected is None or self._selected[0] != id(inputs):
            selected = self.select(inputs)
        else:
            selected = self._selected[1]
        self._selected = None
        return hidden, (kept & ~inputs.candidates()) | selected

    def select(self, inputs: ScoringInputs) -> torch.Tensor:
        """(B, N) bool: the image pivots and what each pivot picked, for every image of the batch."""
        groups = image_groups(inputs)
        norms = self._pivot_norms(inputs)  # (B, L_cur)
        states = inputs[SIMILARITY_STATES].float()  # (B, L_cur, D)
        layout = inputs.layout
        member_seq = layout.seq_index[groups.sample[:, None], groups.slots]  # (G, M) current positions
        count = groups.member.sum(1)  # (G,)
        # Image pivots: the largest norms among the image's tokens.
        image_norms = norms[groups.sample[:, None], member_seq].masked_fill(~groups.member, -torch.inf)
        n_image = min(self.image_pivots, groups.member.shape[1])
        image_top = image_norms.topk(n_image, dim=1)  # (G, P)
        image_ok = image_top.values > -torch.inf
        # Text pivots: the largest norms among the real text tokens after the image.
        text_seq, text_ok = self._text_pivots(inputs, groups, member_seq, norms)  # (G, T)
        taken = torch.zeros_like(groups.member)
        taken.scatter_(1, image_top.indices, image_ok)
        image_seq = member_seq.gather(1, image_top.indices)  # (G, P)
        pivot_seq = torch.cat([image_seq, text_seq], dim=1)  # (G, S)
        pivot_ok = torch.cat([image_ok, text_ok], dim=1)
        order = self._visit_order(inputs, groups, pivot_seq, pivot_ok)  # (G, S)
        pivot_seq, pivot_ok = pivot_seq.gather(1, order), pivot_ok.gather(1, order)
        quota = self._quotas(groups, count, pivot_ok)  # (G, S) tokens each pivot picks
        unit = torch.nn.functional.normalize(states, dim=-1)
        rows = groups.sample[:, None]
        member_unit = unit[rows, member_seq]  # (G, M, D)
        pivot_unit = unit[rows, pivot_seq]  # (G, S, D)
        similarity = pivot_unit @ member_unit.transpose(1, 2)  # (G, S, M) cosine
        steps = torch.arange(int(quota.max()) if quota.numel() else 0, device=quota.device)
        for s in range(pivot_seq.shape[1]):  # a handful of pivots, each one batched update
            if not steps.numel():
                break
            free = groups.member & ~taken
            least_similar = (-similarity[:, s]).masked_fill(~free, -torch.inf)  # (G, M)
            top = least_similar.topk(min(steps.numel(), least_similar.shape[1]), dim=1)
            picked = (steps[None, : top.indices.shape[1]] < quota[:, s, None]) & (top.values > -torch.inf)
            taken.scatter_(1, top.indices, picked | taken.gather(1, top.indices))
        selected = torch.zeros(layout.seq_index.shape, dtype=torch.bool, device=taken.device)
        selected[rows.expand_as(groups.slots)[taken], groups.slots[taken]] = True
        return selected

    def _text_pivots(
        self, inputs: ScoringInputs, groups: ImageGroups, member_seq: torch.Tensor, norms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, T) current positions of each image's text pivots and (G, T) bool: a real pivot."""
        layout = inputs.layout
        length = norms.shape[1]
        origin = inputs.origin if inputs.origin is not None else torch.arange(length).expand_as(norms)
        real = inputs.attention_mask.bool().gather(1, origin.to(inputs.attention_mask.device))  # (B, L_cur)
        visual = torch.zeros_like(real)
        visual.scatter_(1, layout.seq_index, layout.valid & inputs.alive)
        text = (real & ~visual)[groups.sample]  # (G, L_cur)
        in_image = layout.valid[groups.sample] & (
            layout.image_index[groups.sample] == self._image_of(groups, layout)
        )
        last = torch.where(in_image, layout.seq_index[groups.sample], -1).max(dim=1).values  # (G,)
        after = torch.arange(length, device=norms.device)[None, :] > last[:, None]
        text_norms = norms[groups.sample].masked_fill(~(text & after), -torch.inf)  # (G, L_cur)
        top = text_norms.topk(min(self.text_pivots, length), dim=1)
        return top.indices, top.values > -torch.inf

    @staticmethod
    def _image_of(groups: ImageGroups, layout: VisualLayout) -> torch.Tensor:
        """(G, 1) the image index of each group."""
        return layout.image_index[groups.sample, groups.slots[:, 0]][:, None]

    def _visit_order(
        self, inputs: ScoringInputs, groups: ImageGroups, pivot_seq: torch.Tensor, pivot_ok: torch.Tensor
    ) -> torch.Tensor:
        """(G, S) permutation of the pivots: the official visiting order first, missing pivots last."""
        padding = (1 - inputs.attention_mask.long()).sum(1)  # (B,) left padding of each sample
        origin = inputs.origin if inputs.origin is not None else None
        prompt = pivot_seq if origin is None else origin[groups.sample[:, None], pivot_seq]
        prompt = (prompt - padding[groups.sample, None]).tolist()  # positions in the sample's own prompt
        n_image = min(self.image_pivots, groups.member.shape[1])
        orders = []
        for positions, ok in zip(prompt, pivot_ok.tolist(), strict=True):  # per image: a few pivots
            images = [p for p, real in zip(positions[:n_image], ok[:n_image], strict=True) if real]
            texts = [p for p, real in zip(positions[n_image:], ok[n_image:], strict=True) if real]
            real_index = [i for i, real in enumerate(ok) if real]
            visited = [real_index[i] for i in pivot_order(images, texts)]
            orders.append(visited + [i for i in range(len(ok)) if i not in visited])
        return torch.tensor(orders, dtype=torch.long, device=pivot_seq.device).reshape(pivot_seq.shape)

    def _quotas(self, groups: ImageGroups, count: torch.Tensor, pivot_ok: torch.Tensor) -> torch.Tensor:
        """(G, S) how many tokens each pivot (in visiting order) picks."""
        pivots = self.image_pivots + self.text_pivots
        n_image = torch.clamp(count, max=self.image_pivots)  # image pivots each image has
        budget = torch.minimum(groups.budget, count)
        if not self.exact:  # official: one count for every pivot, from the budget
            per_pivot = torch.minimum(budget, count - n_image) // pivots  # (G,)
            return per_pivot[:, None] * pivot_ok.long()
        # exact: the budget less the image pivots, split over the real pivots, the first ones one more
        real = pivot_ok.long()
        picks = (budget - torch.clamp(n_image, max=budget)).clamp(min=0)
        pivots_here = real.sum(1).clamp(min=1)
        rank = real.cumsum(1) - 1  # rank of each real pivot
        share = picks // pivots_here
        return real * (share[:, None] + (rank < (picks % pivots_here)[:, None]).long())
