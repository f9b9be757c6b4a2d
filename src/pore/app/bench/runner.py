"""The sweep: every batch size x attention backend x budget x approach, measured the same way.

Approaches, all on the same model object and the same inputs:

- `unpruned`: the model as is (the budget that keeps every image token is this reference);
- `pruned`: our `Pruner` with a strategy (fastv, pore_linear, ...) keeping `budget` image tokens;
- `ideal`: `IdealReducer`, the same layer split with a fixed kept index and no scoring (see reduce.py);
- `fastv_eager`: the official FastV approach (see fastv_eager.py), with the language model in eager
  attention; `unpruned` under eager is measured too, as its own base.

For each: prefill latency (a forward over the prompt with a KV cache and only the last position's logits,
which is what `generate` does first), the pruner's costs inside the forward (instrumented repeats, also
round-robin, apart from the timed ones so that the probes cannot slow the numbers down), peak memory of one
prefill and one generation, and generation of `new_tokens` tokens (greedy, never stopping early).
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from pore import Pruner, adapter_for, build_strategy
from pore.app.bench.architecture import Architecture, build_model, count_parameters, describe
from pore.app.bench.entry import SCORING_ATTENTION, VISION, Attachable, Entry, Setting, entry_record
from pore.app.bench.fastv_eager import EagerFastV
from pore.app.bench.probes import Probe, added_hooks, hook_table
from pore.app.bench.profile import is_profile_target, profile_setting
from pore.app.bench.reduce import IdealReducer
from pore.app.bench.settings import BenchSettings, implementation_problem
from pore.app.bench.timing import clock_for, free_memory, is_out_of_memory, peak_memory_mb
from pore.app.bench.workload import Workload, make_workload

log = logging.getLogger("pore.bench")


class Runner:
    def __init__(self, settings: BenchSettings, architecture: Architecture) -> None:
        self.settings = settings
        self.architecture = architecture
        self.device = settings.torch_device()
        self.dtype = settings.torch_dtype(self.device)
        if settings.threads and self.device.type == "cpu":
            torch.set_num_threads(int(settings.threads))
        self.clock = clock_for(self.device, settings.cpu_clock)
        self.results: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.profiles: list[dict[str, Any]] = []
        self.model: nn.Module | None = None

    # ------------------------------------------------------------------ the sweep

    def run(self, on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        settings = self.settings
        implementations = []
        for name in settings.implementations:
            problem = implementation_problem(name, self.device, self.dtype)
            if problem:
                self.skipped.append({"implementation": name, "reason": problem})
                log.warning("skipping %s: %s", name, problem)
            else:
                implementations.append(name)
        if not implementations:
            raise RuntimeError(f"no usable attention implementation among {list(settings.implementations)}")
        base = implementations[0]
        self._check_fits()
        model = build_model(
            self.architecture, self.device, self.dtype, base, weights=settings.weights, seed=settings.seed
        )
        self.model = model
        layers = len(adapter_for(model).decoder_layers())
        if not 0 < settings.layer < layers:
            raise ValueError(f"bench.layer must be in 1..{layers - 1} for this model, got {settings.layer}")
        with torch.inference_mode():
            for batch in settings.batch_sizes:
                workload = make_workload(
                    model.config,
                    batch,
                    self.device,
                    self.dtype,
                    settings.prefix_tokens,
                    settings.suffix_tokens,
                    settings.seed,
                )
                self._sweep_batch(workload, implementations, base, on_result)
                del workload
                free_memory(self.device)
        return self.summary()

    def _check_fits(self) -> None:
        """Refuse early, with a hint, when the weights alone would not fit (e.g. 7B in fp32 on a laptop)."""
        needed = count_parameters(self.architecture) * torch.finfo(self.dtype).bits // 8
        if self.device.type == "cuda":
            available = torch.cuda.mem_get_info(self.device)[1]
        else:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > 0.9 * available:
            raise RuntimeError(
                f"{self.architecture.name} needs {needed / 2**30:.1f} GiB of weights in {self.dtype}, "
                f"more than this {self.device.type} has ({available / 2**30:.1f} GiB); on a CPU use "
                "bench.architecture=llava15_small (LLaVA-1.5's token geometry, a small language model)"
            )

    def budgets_for(self, image_tokens: int) -> list[int]:
        """The pruned budgets (largest first); a budget of all the image tokens or more is the reference."""
        budgets = sorted({b for b in self.settings.budgets if b < image_tokens}, reverse=True)
        for b in self.settings.budgets:
            if b > image_tokens:
                log.info(
                    "budget %d >= the %d image tokens: measured as the unpruned reference", b, image_tokens
                )
        return budgets

    def _entries(self, workload: Workload, implementations: list[str], base: str) -> list[Entry]:
        """Every setting of one batch, with the attention backend it needs and how to attach it."""
        settings, model = self.settings, self.model
        n, b = workload.image_tokens, workload.batch
        budgets = self.budgets_for(n)
        entries = []
        for implementation in implementations:
            entries.append(Entry(Setting(b, implementation, "unpruned", n), implementation, None))
            for budget in budgets:
                index = workload.uniform_index(budget)
                entries.append(
                    Entry(
                        Setting(b, implementation, "ideal", budget),
                        implementation,
                        lambda index=index: IdealReducer(model, settings.layer, index),
                    )
                )
                for strategy in settings.strategies:
                    entries.append(
                        Entry(
                            Setting(b, implementation, "pruned", budget, strategy),
                            implementation,
                            lambda strategy=strategy, budget=budget: Pruner(
                                model, build_strategy(strategy, keep=budget, layer=settings.layer)
                            ),
                        )
                    )
        if settings.include_eager_fastv:
            # Only the language model goes eager (FastV needs its attention weights); the vision tower keeps
            # the base backend, so that eager FastV is not charged for a slower vision tower.
            eager = {"": base, "vision_config": base, "text_config": "eager"}
            entries.append(Entry(Setting(b, "eager", "unpruned", n), eager, None))
            for budget in budgets:
                entries.append(
                    Entry(
                        Setting(b, "eager", "fastv_eager", budget, "fastv"),
                        eager,
                        lambda budget=budget: EagerFastV(
                            model, settings.layer, budget, workload.image_positions, workload.text_positions
                        ),
                    )
                )
        return entries

    def _sweep_batch(
        self,
        workload: Workload,
        implementations: list[str],
        base: str,
        on_result: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        """Measure every setting of one batch. Timed calls go round-robin over the settings (one call of each
        per round, the order reversed every other round), so that a slow spell of the machine (another
        process, clocks, heat) falls on all of them alike instead of on whichever ran then."""
        settings, model = self.settings, self.model
        entries = self._entries(workload, implementations, base)
        inputs = workload.model_inputs()
        config = _generation_config(model, settings.new_tokens)

        def prefill() -> Any:
            return model(**inputs, use_cache=True, logits_to_keep=1)

        def generate() -> torch.Tensor:
            return model.generate(**inputs, generation_config=config)

        batch = workload.batch
        try:
            log.info(
                "batch %d: %d settings, warm-up (%d prefills each)", batch, len(entries), settings.warmup
            )
            for entry in entries:  # also a check that each setting runs at all
                self._call(entry, lambda e: [prefill() for _ in range(settings.warmup)])
            log.info("batch %d: %d rounds of timed prefills", batch, settings.repeats)
            self._rounds(entries, prefill, settings.repeats, "prefill_ms")
            log.info("batch %d: %d rounds of instrumented prefills", batch, settings.instrumented_repeats)
            for round_index in range(settings.instrumented_repeats):
                for entry in entries if round_index % 2 == 0 else entries[::-1]:
                    self._call(entry, lambda e: self._probe_once(e, prefill))
            log.info("batch %d: peak memory", batch)
            for entry in entries:
                self._call(entry, lambda e: self._prefill_details(e, prefill))
            if settings.generate_repeats:
                log.info("batch %d: %d rounds of timed generation", batch, settings.generate_repeats)
                for entry in entries:
                    self._call(entry, lambda e: self._generate_details(e, workload, generate), "generate")
                self._rounds(entries, generate, settings.generate_repeats, "generate_ms")
        finally:
            model.set_attn_implementation(base)
        for entry in entries:
            record = entry_record(entry, workload, self.settings.new_tokens)
            log.info("%s", _one_line(entry.setting, record))
            self.results.append(record)
            if on_result is not None:
                on_result(record)

    # ------------------------------------------------------------------ one setting

    @contextlib.contextmanager
    def _attached(
        self, entry: Entry
    ) -> Iterator[tuple[Attachable | None, list[tuple[str, nn.Module, bool, bool]]]]:
        """The model set up for `entry`: its attention backend, and its pruner / reducer attached."""
        self.model.set_attn_implementation(entry.attention)
        if entry.factory is None:
            yield None, []
            return
        before = hook_table(self.model)
        attached = entry.factory()
        attached.attach()
        try:
            yield attached, added_hooks(self.model, before)
        finally:
            attached.detach()

    def _call(self, entry: Entry, body: Callable[[Entry], Any], phase: str = "prefill") -> Any:
        """Run `body` with the entry attached. An OOM or error retires the entry for this phase and those
        after it (a generation OOM keeps the prefill results); it is recorded and the sweep goes on."""
        if entry.status != "ok" or (phase == "generate" and entry.generate_status != "ok"):
            return None
        try:
            with self._attached(entry) as (attached, added):
                entry.attached, entry.added = attached, added
                return body(entry)
        except Exception as error:
            status = "oom" if is_out_of_memory(error) else "error"
            if status == "error":
                entry.error = f"{type(error).__name__}: {error}"
                log.error("%s failed (%s):\n%s", entry.setting.label(), phase, traceback.format_exc())
            else:
                log.warning("%s: out of memory (%s)", entry.setting.label(), phase)
            if phase == "generate":
                entry.generate_status = status
            else:
                entry.status = status
            free_memory(self.device)
            return None
        finally:
            entry.attached, entry.added = None, []

    def _rounds(self, entries: list[Entry], fn: Callable[[], Any], repeats: int, key: str) -> None:
        """`repeats` timed calls of `fn` per entry, one per entry per round, into `entry.times[key]` (ms)."""
        clock = self.clock
        phase = "generate" if key == "generate_ms" else "prefill"

        def one(entry: Entry) -> None:
            clock.sync()
            start = clock.mark()
            fn()
            end = clock.mark()
            clock.sync()
            entry.times.setdefault(key, []).append(clock.elapsed_ms(start, end))

        for round_index in range(repeats):
            order = entries if round_index % 2 == 0 else entries[::-1]
            for entry in order:
                self._call(entry, one, phase)

    def _prefill_details(self, entry: Entry, prefill: Callable[[], Any]) -> None:
        """Kept tokens, peak memory of one prefill, and the profile if asked for."""
        out = entry.details
        memory = peak_memory_mb(prefill, self.device)
        if memory is None:
            prefill()  # no memory peak on a CPU, but the kept-token count below reads this prefill
        out["peak_memory_mb"] = {"prefill": memory}
        out["kept_image_tokens"] = _kept_image_tokens(entry.attached, entry.setting)
        if self.settings.profile and is_profile_target(self.settings, entry.setting):
            profile = profile_setting(entry.setting, prefill, entry.added, self.device, self.settings)
            self.profiles.append(profile)

    def _generate_details(self, entry: Entry, workload: Workload, generate: Callable[[], Any]) -> None:
        """A check that generate makes exactly `new_tokens` tokens (also its warm-up), and its peak memory."""
        produced = generate().shape[1] - workload.length
        if produced != self.settings.new_tokens:
            raise RuntimeError(f"generate produced {produced} tokens, not {self.settings.new_tokens}")
        entry.details.setdefault("peak_memory_mb", {})["generate"] = peak_memory_mb(generate, self.device)

    def _probe_once(self, entry: Entry, prefill: Callable[[], Any]) -> None:
        """One prefill with probes on the attached object's hook chains, the vision tower and layer K-1's
        attention."""
        probe = Probe(self.clock)
        for name, module, pre, post in entry.added:
            probe.around_hooks(module, name, pre, post)
        adapter = adapter_for(self.model)
        vision = getattr(adapter.multimodal_module(), "vision_tower", None)
        if vision is not None:
            probe.around_module(vision, VISION)
        probe.around_module(
            adapter.attention_module(adapter.decoder_layers()[self.settings.layer - 1]), SCORING_ATTENTION
        )
        try:
            prefill()
            entry.probe_runs.append(probe.collect())
        finally:
            probe.remove()
        entry.hook_labels = {f"{name}:pre-hooks" for name, _, pre, _ in entry.added if pre}
        entry.hook_labels |= {f"{name}:hooks" for name, _, _, post in entry.added if post}

    # ------------------------------------------------------------------ results

    def summary(self) -> dict[str, Any]:
        architecture = self.architecture
        return {
            "model": {**describe(architecture), "parameters": count_parameters(architecture)},
            "settings": {
                key: value
                for key, value in asdict(self.settings).items()
                if key not in ("targets", "output", "profile")
            },
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "clock": self.clock.name,
            "skipped": self.skipped,
            "results": self.results,
            "profiles": self.profiles,
        }


def _generation_config(model: nn.Module, new_tokens: int) -> GenerationConfig:
    """Greedy, exactly `new_tokens` tokens: random weights may pick EOS at any step, and a run that stops
    early would time less work. `min_new_tokens` forbids EOS until then."""
    text = model.config.get_text_config()
    eos = getattr(text, "eos_token_id", None)
    pad = getattr(text, "pad_token_id", None)
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else (eos if eos is not None else 0),
    )


def _kept_image_tokens(attached: Attachable | None, setting: Setting) -> int | None:
    """Image tokens kept per sample at the last prefill, as the approach itself reports them."""
    if isinstance(attached, Pruner):
        record = attached.last_record
        kept = getattr(record, "kept", None)
        return int(kept[0].sum()) if kept is not None else None
    if isinstance(attached, EagerFastV) and attached.last_kept is not None:
        return int(attached.last_kept.shape[1])
    if isinstance(attached, IdealReducer):
        return setting.budget
    return None if attached is not None else setting.budget


def _one_line(setting: Setting, record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{setting.label():<48} {record['status']}"
    prefill = record["prefill_ms"]
    spread = f"[{prefill['p10']:.2f}, {prefill['p90']:.2f}]"
    line = f"{setting.label():<48} prefill {prefill['median']:9.2f} ms {spread}"
    if "generate_ms" in record:
        line += f"  generate {record['generate_ms']['median']:9.2f} ms  {record['tokens_per_s']:9.1f} tok/s"
    memory = record["peak_memory_mb"].get("prefill")
    if memory:
        line += f"  peak {memory['peak'] / 1024:.2f} GiB"
    return line
