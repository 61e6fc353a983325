"""Run the network before a target layer once, then replay only what follows it.

Overfitting one layer re-runs the backbone at every optimizer step, although nothing before the
target changes between steps. :func:`record_prefix` watches the base pass and keeps the output of
every *maximal* module call that finished before the target was first called (the embeddings, the
layers before the target's, the attention block before an MLP target, LeNet's conv stack and
``fc1``); :meth:`PrefixCache.replay` then short-circuits exactly those calls, so a pass runs the
target, what follows it, and the cheap functional glue of the modules that contain the target.

Why module calls and not a graph split (``torch.export``/``torch.fx`` partitioned at the target):
a cut through the module tree needs no tracing, so every eager model works (data-dependent control
flow, ``ModelOutput`` returns), and tensors computed before the target and read after it (residual
connections) are served from the cache as they are, so the split is always clean. The replay is exact
when the pass is deterministic and free of side effects before the target (eval mode); it refuses
(``PrefixCache.usable`` false, with the reason) when a kept output was changed in place during the
pass, and :func:`~ocd_hf.finetune.overfit_deltas` also checks that a replayed pass reproduces the
base output bit for bit before using it, falling back to full passes otherwise.

Hand-written rather than accelerate's ``ModelHook``: those hooks wrap a module's forward but cannot skip it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors inside a module's output (a tensor, or tuples, lists and dicts of them, e.g. a ``ModelOutput``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class ReplayMismatch(RuntimeError):
    """A replayed pass does not follow the base pass before the target (control flow, in-place writes)."""


@dataclass
class PrefixCache:
    """The outputs of the maximal module calls before the target, in call order.

    ``usable`` is false (and ``reason`` says why) when the base pass never reached the target, ran no
    module before it, or changed a kept output in place (a replay would read the changed value).
    """

    target: nn.Module
    entries: list[tuple[nn.Module, Any, list[int]]] = field(default_factory=list)
    reached_target: bool = False
    reason: str = ""

    @property
    def usable(self) -> bool:
        return not self.reason

    def check(self) -> None:
        """Set ``reason`` if the cache cannot be replayed."""
        if not self.reached_target:
            self.reason = "the target layer was not called in the base pass"
        elif not self.entries:
            self.reason = "no module runs before the target layer"
        elif self.changed_in_place():
            self.reason = "an output computed before the target layer is changed in place later in the pass"

    def changed_in_place(self) -> bool:
        """Whether a kept output has been written to since it was recorded (its version counter moved)."""
        return any(
            tensor._version != version for _, output, versions in self.entries for tensor, version in zip(_tensors(output), versions)
        )

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """One forward pass inside the block skips the cached module calls and returns their kept outputs.

        Raises :class:`ReplayMismatch` if the pass calls modules before the target in another order than the
        base pass (its control flow differs, so the cache does not describe it).
        """
        if not self.usable:
            raise ReplayMismatch(f"This prefix cache cannot be replayed: {self.reason}.")
        cursor = {"next": 0, "started": False}
        modules = {id(module): module for module, _, _ in self.entries}
        saved = {key: module.__dict__.get("forward") for key, module in modules.items()}

        def on_target(module: nn.Module, args: tuple) -> None:
            cursor["started"] = True

        def replacement(module: nn.Module, original: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if cursor["started"]:
                    return original(*args, **kwargs)
                index = cursor["next"]
                if index >= len(self.entries) or self.entries[index][0] is not module:
                    raise ReplayMismatch(
                        f"The replayed pass called {type(module).__name__} as module call {index} before the target, "
                        "where the base pass called another module: its control flow differs, so the prefix cache does not apply."
                    )
                cursor["next"] = index + 1
                return self.entries[index][1]

            return forward

        handle = self.target.register_forward_pre_hook(on_target)
        try:
            for module in modules.values():
                # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up per call.
                module.forward = replacement(module, module.forward)
            yield
        finally:
            handle.remove()
            for key, module in modules.items():
                if saved[key] is None:
                    del module.forward
                else:
                    module.forward = saved[key]
        if self.changed_in_place():
            self.reason = "an output computed before the target layer was changed in place during a replayed pass"
            raise ReplayMismatch(f"The prefix cache is no longer valid: {self.reason}.")
        if cursor["started"] and cursor["next"] != len(self.entries):
            raise ReplayMismatch(
                f"The replayed pass reached the target after {cursor['next']} of the {len(self.entries)} cached module calls: "
                "its control flow differs from the base pass."
            )


@contextlib.contextmanager
def record_prefix(backbone: nn.Module, target: nn.Module) -> Iterator[PrefixCache]:
    """Record a :class:`PrefixCache` of ``backbone`` before ``target`` during the (first) forward pass in the block."""
    cache = PrefixCache(target)
    # Open module calls: (module, keys of the finished calls directly inside it). A call that finishes
    # before the target replaces the calls inside it in the cache, so only maximal calls stay.
    stack: list[tuple[nn.Module, list[int]]] = []
    kept: dict[int, tuple[nn.Module, Any, list[int]]] = {}
    top_level: list[int] = []
    state = {"calls": 0, "done": False}

    def before(module: nn.Module, args: tuple) -> None:
        if state["done"]:
            return
        if module is target:
            state["done"] = cache.reached_target = True
            return
        stack.append((module, []))

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        if state["done"] or not stack or stack[-1][0] is not module:
            return
        _, inside = stack.pop()
        for key in inside:
            kept.pop(key, None)
        key = state["calls"]
        state["calls"] += 1
        kept[key] = (module, output, [tensor._version for tensor in _tensors(output)])
        (stack[-1][1] if stack else top_level).append(key)

    handles = []
    for module in backbone.modules():
        handles.append(module.register_forward_pre_hook(before))
        # First among the forward hooks: the kept output is the forward's own, since a replayed call still runs the
        # module's hooks on what the replacement forward returns (a hook's change would otherwise apply twice).
        handles.append(module.register_forward_hook(after, prepend=True))
    try:
        yield cache
    finally:
        for handle in handles:
            handle.remove()
    cache.entries = [kept[key] for key in sorted(kept)]
    cache.check()
