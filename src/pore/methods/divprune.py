"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse image tokens, before the language model.

The official rule (vbdi/divprune, `DivPrune` in `LLaVA/llava/model/llava_arch.py`) works on the projected
image tokens (the language model's input embeddings of the image) with the cosine distance
d(i, j) = 1 - cos(x_i, x_j), and solves the max-min diversity problem greedily:

1. the first pick is the token whose nearest other token is farthest (the second smallest distance of each
   column, the smallest being the token itself);
2. each next pick is the token whose smallest distance to the tokens picked so far is largest;

until the budget is picked; ties go to the earlier token (`argmax`). The kept tokens are removed from the
sequence (`positions=official` = `compact`). No attention is read, so no prior applies.

Here every image of the batch runs at once: the steps of the greedy loop are a Python loop (the rule is
sequential), each step one batched update over all images and tokens.
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.image_groups import image_groups
from pore.methods.requests import ImageEmbeddings


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """(G, M, D) -> (G, M, M) float32: 1 - cosine similarity of every pair of an image's tokens."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def max_min_diverse(distances: torch.Tensor, member: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Greedy max-min diversity of each image: (G, M, M) distances, (G, M) members, (G,) budgets -> (G, K)
    the member picked at each step (K = the largest budget; -1 past an image's own budget)."""
    groups = distances.shape[0]
    steps = int(budget.max()) if groups else 0
    rows = torch.arange(groups, device=distances.device)
    order = torch.full((groups, steps), -1, dtype=torch.long, device=distances.device)
    if steps == 0:
        return order
    # Padding members are infinitely far from everything, and can never be picked.
    distances = distances.masked_fill(~(member[:, :, None] & member[:, None, :]), torch.inf)
    nearest_other = distances.topk(2, dim=1, largest=False).values[:, 1]  # (G, M)
    first = nearest_other.masked_fill(~member, -torch.inf).argmax(dim=1)  # (G,)
    order[:, 0] = first
    closest = distances[rows, first]  # (G, M): distance of each token to the nearest pick
    picked = torch.zeros_like(member)
    picked[rows, first] = True
    for step in range(1, steps):
        # A picked token is at distance ~0 of itself; masking it keeps exact duplicates from being re-picked.
        pick = closest.masked_fill(picked | ~member, -torch.inf).argmax(dim=1)  # (G,)
        order[:, step] = pick
        picked[rows, pick] = True
        closest = torch.minimum(closest, distances[rows, pick])
    within = torch.arange(steps, device=order.device)[None, :] < budget[:, None]
    return order.masked_fill(~within, -1)


@METHODS.register("divprune")
class DivPrune(PruningMethod):
    official_positions = "compact"  # the official code removes the unpicked tokens before the LLM
    prior_use = "none"  # diversity, not attention: no position bias to correct
    max_stages = 1  # one selection of the image tokens
    requests = (ImageEmbeddings(),)  # the projected image tokens the official rule compares

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        groups = image_groups(inputs)
        features = groups.gather(inputs[ImageEmbeddings()])  # (G, M, D)
        budget = torch.minimum(groups.budget, groups.member.sum(1))
        order = max_min_diverse(cosine_distances(features), groups.member, budget)  # (G, K)
        return groups.scatter_order(order, inputs.layout.seq_index.shape)  # (B, N)
