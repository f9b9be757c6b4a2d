"""SparseVLM (Zhang et al., ICML 2025): text "raters" vote for the image tokens.

In layer K-1 the text tokens of the prompt attend to the image tokens; the raters are the text tokens most
relevant to the image, and an image token's score is the mean attention the raters pay it. Only text tokens
after an image can be raters of it: under the causal mask the ones before it cannot see it. Each image is
rated by the text after it. Who the raters are (`strategy.options.raters`):

- `official` (default, the official v1 code): chosen once per prompt, before the first layer, from the
  input embeddings: m = softmax over the text tokens of (image embeddings x text embeddings^T), averaged
  over the image tokens; raters are the text tokens with m above its mean (when none is, e.g. a single text
  token, the largest m). The same raters score every stage.
- `attention`: chosen at each stage from layer K-1's attention: the text tokens whose mean attention over
  the image's candidate tokens is at least the mean over the text tokens after the image.
- `attention_all_text`: as `attention`, but over every text token, also those before the image (which
  rate it 0 and lower the threshold): the rule of this project before the official code was read, kept
  to reproduce earlier numbers.

Budgets and stages are the strategy's: the `sparsevlm` preset prunes as the official code, after layers
2 / 6 / 15 (before K = 3 / 7 / 16, scored in layer K-1) keeping 300 / 200 / 110 tokens (the official table
for 192 tokens on average; `sparsevlm_128`, `sparsevlm_96`, `sparsevlm_64` for the others).

Recycling of the dropped tokens (`strategy.options.recycle`):

- `none` (default): dropped tokens are gone;
- `cluster` (the official code): the top 30 % of the dropped tokens of an image (by their rater score:
  `recycle_score`) are clustered into int(0.3 n / 10) + 1 tokens by density-peak clustering (DPC-KNN: local
  density from the k nearest neighbours, k = the number of clusters; centres = the largest density x distance
  to a denser token), each centre carrying the mean of its cluster's hidden states; they come on top of the
  budget and sit at their centre token's place (the official code appends them after the kept image tokens;
  with compact positions only the order inside the image differs; equal densities go to the earlier token
  instead of the official random noise, so the choice is reproducible);
- `similar`: each dropped token is averaged into the kept token of its image it is most similar to (cosine
  similarity), which keeps the budget exact. `merge=true` is the older name of this mode.

Which score ranks the dropped tokens to recycle (`strategy.options.recycle_score`), when a prior reweights the
stage (PoRe):

- `rater` (default, the official code with the PoRe authors' patch): the raters' score as it is, before the
  prior's weights and the padding mask (`attn_postprocess_topk` in score.py returns `relation_vis_text`,
  which the debiasing multiplies into a copy, and modelling_sparse_llama.py ranks the dropped tokens by it);
- `weighted`: the ranked score (rater score x prior x padding mask), this project's rule before issue 20.

The official code removes the dropped tokens, so the kept sequence is renumbered (`positions=official` =
`compact`), and runs batch size 1 with one image; here every image of every sample is rated on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import PromptEmbeddings, Request, TextAttention

RATERS = ("official", "attention", "attention_all_text")
RECYCLE = ("none", "cluster", "similar")
RECYCLE_SCORES = ("rater", "weighted")
RECYCLED_SHARE = 0.3  # official: the top 30 % of the dropped tokens are clustered
TOKENS_PER_CLUSTER = 10  # official: int(recycled / 10) + 1 clusters


@METHODS.register("sparsevlm")
class SparseVLM(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens (docs/methods.md)
    requests = (TextAttention(),)

    def __init__(
        self,
        seed: int = 0,
        raters: str = "official",
        recycle: str = "none",
        merge: bool | None = None,
        recycle_score: str = "rater",
    ) -> None:
        super().__init__(seed)
        if recycle_score not in RECYCLE_SCORES:
            raise ValueError(
                f"sparsevlm: unknown options.recycle_score {recycle_score!r}; valid values: "
                f"{', '.join(RECYCLE_SCORES)}"
            )
        self.recycle_score = recycle_score
        if raters not in RATERS:
            raise ValueError(
                f"sparsevlm: unknown options.raters {raters!r}; valid values: {', '.join(RATERS)}"
            )
        if merge is not None:  # the older name of recycle=similar
            if merge and recycle not in ("none", "similar"):
                raise ValueError("sparsevlm: options.merge=true means recycle=similar; set only recycle")
            recycle = "similar" if merge else recycle
        if recycle not in RECYCLE:
            raise ValueError(
                f"sparsevlm: unknown options.recycle {recycle!r}; valid values: {', '.join(RECYCLE)}"
            )
        self.raters = raters
        self.recycle_mode = recycle

    def observations(self) -> tuple[Request, ...]:
        # The official raters are chosen from the prompt's input embeddings.
        return (*self.requests, PromptEmbeddings()) if self.raters == "official" else self.requests

    # ------------------------------------------------------------------ scoring

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.text_attention is not None and inputs.text_valid is not None
        layout = inputs.layout
        queries = inputs.text_attention.shape[1]
        index = layout.seq_index[:, None, :].expand(-1, queries, -1)  # (B, Q, N)
        to_visual = inputs.text_attention.gather(2, index).double()  # (B, Q, N)
        valid = inputs.text_valid  # (B, Q)
        candidates = inputs.candidates()  # (B, N)
        scores = torch.zeros(layout.seq_index.shape, dtype=torch.float64, device=to_visual.device)
        for image in range(int(layout.images_per_sample.max()) if candidates.numel() else 0):
            in_image = candidates & (layout.image_index == image)  # (B, N)
            if not bool(in_image.any()):
                continue
            raters = self._raters(inputs, image, in_image, to_visual, valid)  # (B, Q)
            votes = (to_visual * raters[:, :, None]).sum(dim=1) / raters.sum(dim=1, keepdim=True).clamp(min=1)
            scores = torch.where(in_image, votes, scores)
        return scores

    def _raters(
        self,
        inputs: ScoringInputs,
        image: int,
        in_image: torch.Tensor,
        to_visual: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """(B, Q) bool: the text queries that rate image `image` (whose candidate tokens are `in_image`)."""
        if self.raters == "official":
            return self._official_raters(inputs, image, valid)
        if self.raters == "attention_all_text":
            eligible = valid
        else:
            eligible = valid & self._after_image(inputs, in_image)
        in_image_f = in_image[:, None, :].double()  # (B, 1, N)
        # Relevance of each text token to the image: its mean attention over the image's candidate tokens.
        relevance = (to_visual * in_image_f).sum(dim=2) / in_image_f.sum(dim=2).clamp(min=1)  # (B, Q)
        mean = (relevance * eligible).sum(dim=1, keepdim=True) / eligible.sum(dim=1, keepdim=True).clamp(
            min=1
        )
        return eligible & (relevance >= mean)  # never empty while a text token follows: the maximum passes

    @staticmethod
    def _after_image(inputs: ScoringInputs, in_image: torch.Tensor) -> torch.Tensor:
        """(B, Q) bool: text queries that come after the image's tokens in the current sequence."""
        last = torch.where(in_image, inputs.layout.seq_index, -1).max(dim=1).values  # (B,)
        return inputs.text_positions > last[:, None]

    def _official_raters(self, inputs: ScoringInputs, image: int, valid: torch.Tensor) -> torch.Tensor:
        """Raters from the prompt's input embeddings: the text tokens after the image whose softmax share of
        the image tokens' similarity, averaged over the image tokens, is above the mean (official v1)."""
        if inputs.input_embeddings is None or inputs.origin is None or inputs.prompt_seq_index is None:
            raise RuntimeError("sparsevlm raters=official needs the prompt's input embeddings")
        layout = inputs.layout
        embeddings = inputs.input_embeddings.float()  # (B, L, D)
        text_prompt = inputs.origin.gather(1, inputs.text_positions)  # (B, Q) positions in the prompt
        of_image = layout.valid & layout.prunable & (layout.image_index == image)  # (B, N) every token of it
        raters = torch.zeros_like(valid)
        for b in range(valid.shape[0]):
            image_slots = inputs.prompt_seq_index[b][of_image[b]]  # (N_i,)
            if image_slots.numel() == 0:
                continue
            after = valid[b] & (text_prompt[b] > image_slots.max())  # (Q,)
            if not bool(after.any()):
                continue
            visual = embeddings[b, image_slots]  # (N_i, D)
            text = embeddings[b, text_prompt[b][after]]  # (T, D)
            share = (visual @ text.T).softmax(dim=1).mean(dim=0)  # (T,)
            chosen = share > share.mean()
            if not bool(chosen.any()):  # all shares equal (e.g. one text token): the official rule picks none
                chosen = share >= share.max()
            raters[b, after.nonzero()[:, 0]] = chosen
        return raters

    # ------------------------------------------------------------------ recycling

    def recycle(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recycle_mode == "similar":
            return self.merge(inputs, hidden, kept), kept
        if self.recycle_mode == "cluster":
            official = self.recycle_score == "rater" and inputs.method_scores is not None
            return self._cluster(inputs, hidden, kept, inputs.method_scores if official else scores)
        return hidden, kept

    def _cluster(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official recycling: per image, the top 30 % of the dropped tokens by `scores` (B, N) are clustered
        (DPC-KNN); each cluster centre is kept too and carries its cluster's mean hidden state."""
        layout = inputs.layout
        dropped = inputs.candidates() & ~kept  # (B, N)
        merged, kept = hidden.clone(), kept.clone()
        for b in range(hidden.shape[0]):
            for image in layout.image_index[b][dropped[b]].unique().tolist():
                slots = (dropped[b] & (layout.image_index[b] == image)).nonzero()[:, 0]  # (S,)
                count = int(slots.numel() * RECYCLED_SHARE) + 1
                order = torch.sort(scores[b, slots], descending=True, stable=True).indices[:count]
                recycled = slots[order]  # (m,) the dropped tokens to recycle
                clusters = min(int(recycled.numel() / TOKENS_PER_CLUSTER) + 1, recycled.numel())
                states = hidden[b, layout.seq_index[b, recycled]].float()  # (m, D)
                centres, assignment = density_peak_clusters(states, clusters)
                means = (
                    torch.zeros(clusters, states.shape[1], device=states.device).index_add_(
                        0, assignment, states
                    )
                    / torch.bincount(assignment, minlength=clusters).clamp(min=1)[:, None]
                )
                centre_slots = recycled[centres]  # (clusters,)
                merged[b, layout.seq_index[b, centre_slots]] = means.to(hidden.dtype)
                kept[b, centre_slots] = True
        return merged, kept

    def merge(self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """recycle=similar: each dropped token is averaged into its most similar kept token of the image."""
        layout = inputs.layout
        dropped = inputs.candidates() & ~kept  # (B, N)
        receivers = kept & layout.valid & layout.prunable  # (B, N)
        merged = hidden.clone()
        for b in range(hidden.shape[0]):
            source, target = dropped[b].nonzero()[:, 0], receivers[b].nonzero()[:, 0]  # slots
            if source.numel() == 0 or target.numel() == 0:
                continue
            h_source = hidden[b, layout.seq_index[b, source]].float()  # (S, D)
            h_target = hidden[b, layout.seq_index[b, target]].float()  # (T, D)
            similarity = F.normalize(h_source, dim=-1) @ F.normalize(h_target, dim=-1).T  # (S, T)
            same_image = layout.image_index[b, source][:, None] == layout.image_index[b, target][None, :]
            similarity = similarity.masked_fill(~same_image, float("-inf"))
            assignment = similarity.argmax(dim=1)  # (S,) the kept token each dropped one joins
            total = h_target.clone().index_add_(0, assignment, h_source)  # (T, D)
            count = torch.ones(target.numel(), device=hidden.device).index_add_(
                0, assignment, torch.ones(source.numel(), device=hidden.device)
            )
            merged[b, layout.seq_index[b, target]] = (total / count[:, None]).to(hidden.dtype)
        return merged


def density_peak_clusters(states: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN as in the official SparseVLM recycling: (clusters,) indices of the centres among the m rows of
    `states` (m, D), and (m,) the cluster of each row (a centre is in its own cluster).

    Distances are Euclidean / sqrt(D); a token's density is exp(-mean squared distance to its `clusters`
    nearest tokens, itself included); its peak distance is the smallest distance to a denser token (the
    largest distance of all for the densest; of equal densities the earlier token counts as the denser);
    the centres are the largest density x peak distance."""
    dim = states.shape[1]
    distance = torch.cdist(states[None], states[None])[0] / dim**0.5  # (m, m)
    nearest = distance.topk(clusters, dim=1, largest=False).values  # (m, k)
    density = (-(nearest**2).mean(dim=1)).exp()  # (m,)
    # (m, m): [i, j] = j is denser than i; equal densities (mutual nearest neighbours) go to the earlier
    # token, where the official code adds random noise of 1e-6.
    index = torch.arange(density.shape[0], device=states.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )
    peak = torch.where(denser, distance, distance.max()).min(dim=1).values  # (m,)
    centres = torch.sort(peak * density, descending=True, stable=True).indices[:clusters]  # (clusters,)
    assignment = distance[:, centres].argmin(dim=1)  # (m,)
    assignment[centres] = torch.arange(clusters, device=states.device)
    return centres, assignment
