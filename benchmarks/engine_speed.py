"""Side-by-side prefill and generation timing: unpruned vs pruned, same random LLaVA, same run.

Builds a LLaVA-1.5-shaped model with random weights (no download): a 24 x 24 grid of image tokens and a
language model whose size is set on the command line. Prints medians over repeats and the speed-up ratios.

    python benchmarks/engine_speed.py --hidden 1024 --layers 8 --batch 4 --keep 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from pore import Pruner, build_strategy


def build(hidden: int, layers: int, attn: str) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=32064,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=576)
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--keep", type=int, nargs="+", default=[192, 64])
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()

    model = build(args.hidden, args.layers, args.attn)
    prompt = [1] + list(range(2, 20)) + [32000] * 576 + list(range(20, 60))
    input_ids = torch.tensor([prompt] * args.batch)
    pixel_values = torch.randn(args.batch, 3, 336, 336)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
    }
    model.generation_config.pad_token_id = 0

    def prefill() -> None:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    def generate() -> None:
        with torch.no_grad():
            model.generate(
                **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, attn={args.attn}, "
        f"batch={args.batch}, "
        f"hidden={args.hidden}, layers={args.layers}, prompt={len(prompt)} tokens (576 image), K={args.layer}"
    )
    rows = (
        [("unpruned", None)]
        + [(f"fastv keep={k}", k) for k in args.keep]
        + [(f"pore_linear keep={k}", k) for k in args.keep]
    )
    base = {}
    print(f"{'setting':<24}{'prefill ms':>12}{'speed-up':>10}{'generate ms':>13}{'speed-up':>10}")
    for label, keep in rows:
        strategy = (
            build_strategy("none")
            if keep is None
            else build_strategy(label.split()[0], keep=keep, layer=args.layer)
        )
        with Pruner(model, strategy):
            p = statistics.median(timed(prefill, args.repeats)) * 1e3
            g = statistics.median(timed(generate, max(1, args.repeats // 2))) * 1e3
        base.setdefault("p", p)
        base.setdefault("g", g)
        print(f"{label:<24}{p:>12.1f}{base['p'] / p:>9.2f}x{g:>13.1f}{base['g'] / g:>9.2f}x")


if __name__ == "__main__":
    main()
