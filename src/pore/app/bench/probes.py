"""Measure what a pruner costs inside a forward, without knowing how the pruner is written.

A pruner works through forward hooks (and, for scoring, inside one attention call). The benchmark finds
every hook that attaching the pruner added, by comparing the models' hook tables before and after, and
brackets each module's hook chain with two hooks of its own: one put in front of the chain
(`prepend=True`) and one after it. On a GPU the brackets record CUDA events, so a span is the device time
from the stream reaching the first mark to reaching the second: the hook's kernels plus any idle time the
hook causes by synchronising with the host. On a CPU they read `perf_counter`.

Whole modules are bracketed the same way (a pre-hook in front, a forward hook at the end): the vision tower
(whose time pruning cannot change) and the attention of layer K-1 (where the engine computes the last
query's attention row; the same module timed in the ideal run, which does no scoring, gives its cost).

With `annotate=True` the brackets open and close `torch.profiler.record_function` ranges instead, so that
a torch profiler trace shows the hooks by name.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from pore.app.bench.timing import Clock

HookTable = dict[int, tuple[frozenset[int], frozenset[int]]]


def hook_table(model: nn.Module) -> HookTable:
    """Ids of every module's forward pre-hooks and forward hooks (the keys of torch's hook dicts)."""
    return {
        id(module): (frozenset(module._forward_pre_hooks), frozenset(module._forward_hooks))
        for module in model.modules()
    }


def added_hooks(model: nn.Module, before: HookTable) -> list[tuple[str, nn.Module, bool, bool]]:
    """(name, module, has new pre-hooks, has new forward hooks) for every module that gained hooks."""
    found = []
    for name, module in model.named_modules():
        pre, post = before.get(id(module), (frozenset(), frozenset()))
        new_pre = bool(set(module._forward_pre_hooks) - pre)
        new_post = bool(set(module._forward_hooks) - post)
        if new_pre or new_post:
            found.append((name or "<model>", module, new_pre, new_post))
    return found


class Probe:
    """Spans of time (or profiler ranges) around hook chains and modules; `collect()` after each forward."""

    def __init__(self, clock: Clock, annotate: bool = False) -> None:
        self.clock = clock
        self.annotate = annotate
        self._handles: list[Any] = []
        self._open: dict[str, Any] = {}
        self._spans: list[tuple[str, Any, Any]] = []

    # ------------------------------------------------------------------ brackets

    def _start(self, label: str) -> None:
        if self.annotate:
            scope = torch.profiler.record_function(label)
            scope.__enter__()
            self._open[label] = scope
        else:
            self._open[label] = self.clock.mark()

    def _end(self, label: str) -> None:
        opened = self._open.pop(label, None)
        if opened is None:
            return
        if self.annotate:
            opened.__exit__(None, None, None)
        else:
            self._spans.append((label, opened, self.clock.mark()))

    def around_hooks(self, module: nn.Module, label: str, pre: bool, post: bool) -> None:
        """Bracket the forward pre-hooks (`pre`) and / or forward hooks (`post`) `module` has now."""
        if pre:
            start, end = f"{label}:pre-hooks", f"{label}:pre-hooks"
            self._handles.append(
                module.register_forward_pre_hook(lambda m, a: self._start(start), prepend=True)
            )
            self._handles.append(module.register_forward_pre_hook(lambda m, a: self._end(end)))
        if post:
            label_post = f"{label}:hooks"
            self._handles.append(
                module.register_forward_hook(lambda m, a, o: self._start(label_post), prepend=True)
            )
            self._handles.append(
                module.register_forward_hook(lambda m, a, o: self._end(label_post), always_call=True)
            )

    def around_module(self, module: nn.Module, label: str) -> None:
        """Bracket the whole forward of `module`, its own hooks included."""
        self._handles.append(module.register_forward_pre_hook(lambda m, a: self._start(label), prepend=True))
        self._handles.append(module.register_forward_hook(lambda m, a, o: self._end(label), always_call=True))

    # ------------------------------------------------------------------ results

    def collect(self) -> dict[str, float]:
        """Milliseconds per label summed over the spans since the last collect (syncs the device)."""
        self.clock.sync()
        totals: dict[str, float] = defaultdict(float)
        for label, start, end in self._spans:
            totals[label] += self.clock.elapsed_ms(start, end)
        self._spans.clear()
        self._open.clear()
        return dict(totals)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._open.clear()
        self._spans.clear()
