"""HiMAP (Yin et al., "Lifting the Veil on Visual Information Flow in MLLMs", CVPR 2025): two stages, each
ranked by the information flow that dominates at its depth.

- Stage 1 (shallow, before layer 2 of LLaVA-1.5-7B): image tokens pass their information to the text, so
  each image token is scored by the attention the text tokens after it pay it in layer K-1 (summed over the
  text rows, mean over heads: `img2txt_attn` of the official `himap.py`); the top ones of each image stay.
- Stage 2 (deeper, before layer 8): image tokens mostly attend to each other, so each remaining image token
  is scored by the attention the remaining image tokens of its image pay it in layer K-1 (summed over those
  query rows: `img2img_attn`), over the sequence stage 1 left.

The official code (ustc-hyin/HiMAP, src/LLaVA/llava/model/language_model/himap.py) removes the dropped tokens
but keeps every survivor's original RoPE position (`position_ids = txt_keep_indexs`), so
`strategy.positions=official` is `original`. It runs batch size 1 with one image; here every image of every
sample is ranked on its own, in one batched pass (the text rows that precede an image give it 0 under the
causal mask, so summing over every text row is the official sum over the rows after the image).

The preset (conf/method/himap.yaml) has the official schedule of src/HiMAP/inference/eval_scivqa.sh: layers
2 / 8, keeping 288 / 72 of 576 tokens (ratios 0.5 / 0.125); the PoRe authors' runs keep 115 / 90
(`pore_authors_himap`). A prior reweights stage 1 only with `strategy.reweight=first` (as the authors do).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import ImageAttention, ImageRows, TextAttention, TextRows

TEXT_STAGE = TextAttention(stage=0)  # img2txt: the text rows of layer K-1, at the first stage only
IMAGE_STAGE = ImageAttention(stage=1)  # img2img: the image rows of layer K-1, at the second stage only


@METHODS.register("himap")
class HiMAP(PruningMethod):
    requests = (TEXT_STAGE, IMAGE_STAGE)
    max_stages: ClassVar[int | None] = 2  # the official rule has a text-guided and an image-guided stage
    prior_use = "any"  # both stages rank by the language model's attention

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        if inputs.stage == 0:
            return self.text_guided(inputs[TEXT_STAGE], inputs.layout.seq_index)
        return self.image_guided(inputs[IMAGE_STAGE], inputs)

    @staticmethod
    def text_guided(rows: TextRows, seq_index: torch.Tensor) -> torch.Tensor:
        """(B, N) float64: the attention of every real text token to each visual token at `seq_index`
        (B, N), summed over the text rows (rows before an image are 0 there: the causal mask)."""
        summed = torch.bmm(rows.valid.to(rows.attention.dtype)[:, None, :], rows.attention)[
            :, 0
        ]  # (B, L_cur)
        return summed.gather(1, seq_index).double()

    @staticmethod
    def image_guided(rows: ImageRows, inputs: ScoringInputs) -> torch.Tensor:
        """(B, N) float64: the attention the remaining prunable tokens of the same image pay each visual
        token, summed over those query rows (official: the square image block of layer K-1). Per image, the
        rows are summed first ((B, Q) x (B, Q, L_cur)), so nothing of size Q x N is built."""
        layout = inputs.layout
        query_image = layout.image_index.gather(1, rows.tokens)  # (B, Q)
        query_counts = layout.prunable.gather(1, rows.tokens) & rows.valid  # (B, Q)
        scores = torch.zeros(layout.seq_index.shape, dtype=torch.float64, device=rows.attention.device)
        for image in range(int(layout.images_per_sample.max()) if scores.numel() else 0):
            weight = (query_counts & (query_image == image)).to(rows.attention.dtype)  # (B, Q)
            summed = torch.bmm(weight[:, None, :], rows.attention)[:, 0]  # (B, L_cur)
            of_image = layout.image_index == image  # (B, N)
            scores = torch.where(of_image, summed.gather(1, layout.seq_index).double(), scores)
        return scores
