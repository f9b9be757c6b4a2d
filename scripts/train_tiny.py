"""Train the embedded model: a small LLaVA (real transformers classes) from scratch on the spatial benchmark.

    python scripts/train_tiny.py assets/tiny-llava --steps 3000 --seed 0

Everything is built here: the word-level tokenizer and processor (pore.testing.tiny_llava), the CLIP + Llama
config, the synthetic train split (pore.testing.spatial, seed of the "train" split). The loss is on the answer
tokens only, with the prompt in the model's own chat template, exactly as the evaluation will prompt it. Runs
on a GPU when one is there, else on the CPU; prints the command, the seed and the training time, and writes
them to `training.json` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pore.testing.spatial import generate
from pore.testing.tiny_llava import DEFAULT_WORDS, IMAGE_TOKEN, build_processor, tiny_llava_config

GRID, PATCH = 8, 8
SUFFIX = "Answer the question using a single word or phrase."


def vocabulary_words(rows: list[dict]) -> list[str]:
    words = set(DEFAULT_WORDS)
    for row in rows:
        words.update(row["question"].replace("?", " ? ").split())
        words.add(row["answer"])
    return sorted(words)


def encode(processor, rows: list[dict]) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    """uint8 images (N, 3, 64, 64), token ids of prompt + answer + </s>, and each prompt's length."""
    images, sequences, prompt_lengths = [], [], []
    tokenizer = processor.tokenizer
    expanded = IMAGE_TOKEN * (GRID * GRID)
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": f"{row['question']}\n{SUFFIX}"}],
            }
        ]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt.replace(IMAGE_TOKEN, expanded))["input_ids"]
        answer_ids = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"]
        sequences.append(prompt_ids + answer_ids + [tokenizer.eos_token_id])
        prompt_lengths.append(len(prompt_ids))
    return torch.stack(images), sequences, prompt_lengths


def normalise(images: torch.Tensor, processor) -> torch.Tensor:
    """What the CLIP image processor does to a 64 x 64 RGB image: rescale, then normalise per channel."""
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def batch_tensors(sequences: list[list[int]], prompt_lengths: list[int], pad_id: int):
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (sequence, prompt) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        start = length - len(sequence)  # left padding, as at evaluation time
        ids[b, start:] = torch.tensor(sequence)
        mask[b, start:] = 1
        labels[b, start + prompt :] = torch.tensor(sequence[prompt:])
    return ids, mask, labels


@torch.no_grad()
def accuracy(model, processor, images, sequences, prompt_lengths, rows, device, batch_size=64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        prompts = [
            s[:p]
            for s, p in zip(
                sequences[start : start + batch_size], prompt_lengths[start : start + batch_size], strict=True
            )
        ]
        ids, mask, _ = batch_tensors(prompts, [len(p) for p in prompts], processor.tokenizer.pad_token_id)
        pixels = normalise(images[start : start + batch_size], processor).to(device)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixels,
            max_new_tokens=3,
            do_sample=False,
        )
        answers = processor.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        correct += sum(
            a.strip() == row["answer"]
            for a, row in zip(answers, rows[start : start + batch_size], strict=True)
        )
    model.train()
    return correct / len(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-samples", type=int, default=24000)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument(
        "--init", type=Path, help="continue training from this checkpoint (a new LR schedule)"
    )
    return parser.parse_args()


def build(args: argparse.Namespace, train_rows: list[dict], device: torch.device) -> tuple[Any, Any, Any]:
    """(model, processor, the record of the checkpoint continued from or None), ready to train."""
    processor = build_processor(image_size=GRID * PATCH, patch_size=PATCH, words=vocabulary_words(train_rows))
    tokenizer = processor.tokenizer
    config = tiny_llava_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        grid=GRID,
        patch_size=PATCH,
        text_layers=args.text_layers,
        hidden=args.hidden,
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        initializer_range=0.02,
    )
    model = LlavaForConditionalGeneration(config)
    previous = None
    if args.init is not None:
        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(args.init)
        previous = json.loads((args.init / "training.json").read_text())
    tokenizer = processor.tokenizer
    model = model.to(device).train()
    generation = model.generation_config
    generation.pad_token_id, generation.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    generation.bos_token_id, generation.max_new_tokens, generation.do_sample = (
        tokenizer.bos_token_id,
        16,
        False,
    )
    return model, processor, previous


def train(
    args: argparse.Namespace, model: Any, processor: Any, rows: dict[str, list[dict]], device: torch.device
) -> list[dict[str, Any]]:
    """AdamW with a warm-up and a cosine decay; the validation accuracy every `--eval-every` steps."""
    started = time.time()
    pad = processor.tokenizer.pad_token_id
    images, sequences, prompt_lengths = encode(processor, rows["train"])
    val_images, val_sequences, val_prompts = encode(processor, rows["val"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for step in range(args.steps):
        index = torch.randint(len(rows["train"]), (args.batch_size,), generator=generator).tolist()
        ids, mask, labels = batch_tensors(
            [sequences[i] for i in index], [prompt_lengths[i] for i in index], pad
        )
        loss = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=normalise(images[index], processor).to(device),
            labels=labels.to(device),
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = accuracy(model, processor, val_images, val_sequences, val_prompts, rows["val"], device)
            history.append({"step": step + 1, "loss": loss.item(), "val_accuracy": acc})
            print(f"step {step + 1}: val accuracy {acc:.3f}", flush=True)
    return history


def main() -> None:
    args = parse_args()
    started = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {"train": generate("train", args.train_samples), "val": generate("val", 256)}
    model, processor, previous = build(args, rows["train"], device)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{parameters / 1e6:.2f}M parameters on {device}; vocabulary {len(processor.tokenizer)}", flush=True
    )
    history = train(args, model, processor, rows, device)

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).cpu().save_pretrained(args.out)
    processor.save_pretrained(args.out)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": parameters,
        "train_samples": args.train_samples,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "training_seconds": round(time.time() - started, 1),
        "history": history,
        "continued_from": previous,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
