"""The LightningModule that answers benchmark questions with a (pruned) VLM, predict-only."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import nn

from pore import compat
from pore.adapters import adapter_for
from pore.app.evaluation.fidelity import first_token_columns, unpruned_first_token_logits
from pore.data import Benchmark, PromptBatch
from pore.engine import Pruner
from pore.flops import prefill_flops
from pore.metrics import METRICS
from pore.strategy import Strategy

ROW_KEYS = (
    "question_id",
    "prompt",
    "prediction",
    "answers",
    "kept_visual_indices",
    "n_visual_tokens",
    "n_visual_tokens_before",
    "prefill_tflops",
    "seconds",
    "meta",
    "error",
)


def failed_row(question_id: str, error: str) -> dict[str, Any]:
    """The row of a sample that could not be run: same keys as an answered one, error set."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(question_id=question_id, error=error)
    return row


class VLMEvaluator(L.LightningModule):
    """Greedy answers for each batch, with the strategy's pruning attached; one output row per sample."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        strategy: Strategy,
        benchmark: Benchmark,
        max_new_tokens: int = 16,
        adapter: str | None = None,
        images_padded: bool | None = None,
        fidelity: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.strategy = strategy
        self.benchmark = benchmark
        self.max_new_tokens = max_new_tokens
        # fidelity: one extra unpruned forward per batch for the first token's KL / top-1 agreement
        self.fidelity = fidelity
        self.adapter = adapter_for(model, adapter)
        # images_padded: whether the preprocessing padded images to a square (padding suppression needs it).
        self.pruner = (
            Pruner(model, strategy, self.adapter, images_padded=images_padded) if strategy.prunes else None
        )
        # A running score for the progress bar; never synchronised across ranks (the final metrics are
        # computed from the merged predictions).
        self.live_metric = METRICS[benchmark.metric](sync_on_compute=False, **benchmark.metric_options())
        self.live_answered = 0
        self.live_failed = 0

    def on_predict_start(self) -> None:
        if self.pruner is not None:
            self.pruner.attach()

    def on_predict_end(self) -> None:
        if self.pruner is not None:
            self.pruner.detach()

    def live_postfix(self) -> dict[str, str]:
        """What the progress bar shows: the benchmark's running headline metric on this rank."""
        postfix = {}
        if self.live_answered:
            values = self.live_metric.compute()
            key = next(iter(values))
            postfix[key] = f"{100 * float(values[key]):.1f}"
        if self.live_failed:
            postfix["failed"] = str(self.live_failed)
        return postfix

    def _tokens_per_layer(self, batch_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, B) real tokens and (layers, B) visual tokens per decoder layer, pruned or not."""
        record = self.pruner.last_record if self.pruner is not None else None
        if record is not None:
            return record.sequence_lengths, record.visual_tokens
        layers = len(self.adapter.decoder_layers())
        real = batch_inputs["attention_mask"].sum(dim=1)
        visual = self.adapter.visual_token_mask(batch_inputs["input_ids"]).sum(dim=1)
        return real.expand(layers, -1), visual.expand(layers, -1)

    def _check_pruned(self, inputs: dict[str, torch.Tensor], record: Any, visual: torch.Tensor) -> None:
        """Fail the run when the pruner did not prune this batch: rows would report the unpruned model's
        answers (or 0 visual tokens) as if they were pruned. Rows of earlier batches stay on disk."""
        in_prompt = self.adapter.visual_token_mask(inputs["input_ids"]).sum(dim=1).cpu()  # (B,)
        if not bool((in_prompt > 0).any()):
            return
        if record is None or record.visual_tokens.shape[1] != in_prompt.shape[0]:
            raise compat.PruningTripwire(
                f"strategy {self.strategy.name!r} prunes, but generate() left no pruning record for this "
                f"batch"
            )
        before, after = visual[0].cpu(), visual[-1].cpu()
        broken = (in_prompt > 0) & ((before == 0) | (after == 0))
        if bool(broken.any()):
            b = int(broken.nonzero()[0])
            raise compat.PruningTripwire(
                f"strategy {self.strategy.name!r} prunes, but sample {b} of the batch reports "
                f"{int(after[b])} visual tokens kept of {int(before[b])}, while its prompt holds "
                f"{int(in_prompt[b])} image tokens"
            )

    def _timed_generate(
        self, inputs: dict[str, torch.Tensor], samples: int
    ) -> tuple[torch.Tensor, float, list[dict[str, Any]]]:
        """(B, L') generated ids, seconds per sample, and per sample the fidelity columns (empty unless
        `fidelity`: then one unpruned step runs first, outside the clock)."""
        pad_token_id = self.processor.tokenizer.pad_token_id
        reference_logits = None
        if self.fidelity:  # before the clock starts: the extra forward is not the run's latency
            reference_logits = unpruned_first_token_logits(self.model, self.pruner, inputs, pad_token_id)
        extra = {"output_logits": True, "return_dict_in_generate": True} if self.fidelity else {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        output = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_token_id, **extra
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds_per_sample = (time.perf_counter() - started) / samples
        if not self.fidelity:
            return output, seconds_per_sample, [{}] * samples
        return output.sequences, seconds_per_sample, first_token_columns(reference_logits, output.logits[0])

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, Any]]:
        rows = [failed_row(failed.question_id, failed.error) for failed in batch.failed]
        self.live_failed += len(batch.failed)
        if batch.inputs is None:
            return rows

        inputs = {key: value.to(self.device) for key, value in batch.inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if self.pruner is not None:
            self.pruner.set_image_sizes(batch.image_sizes)
            self.pruner.set_texts([sample.text for sample in batch.samples])
            self.pruner.last_record = None  # a record left by the previous batch must not pass for this one
        prompt_length = inputs["input_ids"].shape[1]
        output_ids, seconds_per_sample, fidelity = self._timed_generate(inputs, len(batch.samples))

        answers = [
            text.strip()
            for text in self.processor.batch_decode(output_ids[:, prompt_length:], skip_special_tokens=True)
        ]
        lengths, visual = self._tokens_per_layer(inputs)
        record = self.pruner.last_record if self.pruner is not None else None
        if self.pruner is not None:
            self._check_pruned(inputs, record, visual)
        text_config = self.adapter.language_model().config
        for b, sample in enumerate(batch.samples):
            kept = None
            if record is not None:
                per_image = record.kept_raster[b]
                kept = per_image[0] if len(per_image) == 1 else per_image
            rows.append(
                {
                    "question_id": sample.question_id,
                    "prompt": batch.prompts[b],
                    "prediction": answers[b],
                    "answers": sample.answers,
                    "kept_visual_indices": kept,
                    "n_visual_tokens": int(visual[-1, b]),
                    "n_visual_tokens_before": int(visual[0, b]),
                    "prefill_tflops": prefill_flops(text_config, lengths[:, b].tolist()) / 1e12,
                    "seconds": seconds_per_sample,
                    "meta": sample.meta,
                    "error": None,
                    **fidelity[b],
                }
            )
        metas = [sample.meta for sample in batch.samples]
        self.live_metric.update(
            answers, [s.answers for s in batch.samples], **self.benchmark.metric_extras(metas)
        )
        self.live_answered += len(batch.samples)
        return rows
