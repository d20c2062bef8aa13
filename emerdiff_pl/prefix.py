"""Shared prefix of the t_m call: what runs before the modulated layer is computed once per image.

At t_m every branch row of an image starts from the same x_{t_m} and nothing differs between rows until the
modulated layer adds ±λ·M_i, so every module that finishes before that layer starts (conv_in, the time
embedding, the down blocks, the mid block, the first up blocks, …) gets identical rows. `PrefixSharing` learns
that set of modules from the execution order of one U-Net call; between `share(rows)` and `stop()` it runs
each of them on one representative row per image and expands the result back to every row. Forward hooks, not a
patched forward: the U-Net is diffusers' own, and the hooks do nothing outside the t_m call (docs/method.md §4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from emerdiff_pl.attention import AttentionController


def prefix_modules(order: list[tuple[str, str]], layer: str) -> list[str]:
    """Names of the outermost modules whose every call ends before `layer` starts.

    `order` is the call's ("enter" | "exit", module name) events; the root module is named ""."""
    start = order.index(("enter", layer))
    before = {name for event, name in order[:start] if event == "exit"}
    after = {name for _, name in order[start:]}
    done = (before - after) - {""}

    def has_done_ancestor(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in done for i in range(1, len(parts)))

    return [
        name for name in dict.fromkeys(n for _, n in order) if name in done and not has_done_ancestor(name)
    ]


class PrefixSharing:
    """Runs the modules before the modulated layer once per image at the t_m call (hooks on a diffusers U-Net).

    `trace_next_call()` records the module order of the next U-Net call (any call: the order is static) and
    then hooks the prefix modules. `share(rows)` turns sharing on for the rows of one call (`rows[i]` = image of
    row i, as `AttentionController.rows`); `stop()` turns it off.
    """

    def __init__(self, unet: nn.Module, controller: AttentionController):
        self.unet, self.controller = unet, controller
        self.modules: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._tracer: list[RemovableHandle] = []
        # while sharing: (the first row of each image, each row's image slot)
        self._plan: tuple[Tensor, Tensor] | None = None
        self._saved_rows: Tensor | None = None  # controller.rows while a prefix module runs reduced
        self._reduced = False  # a prefix module is running on one row per image

    @property
    def ready(self) -> bool:
        return bool(self.modules)

    def trace_next_call(self) -> None:
        order: list[tuple[str, str]] = []
        tracer = self._tracer

        def enter(name: str) -> Callable:
            return lambda module, args: order.append(("enter", name))

        def leave(name: str) -> Callable:
            def hook(module, args, output):
                order.append(("exit", name))
                if name == "":  # the U-Net call is over
                    self.hook(prefix_modules(order, self.controller.modulated_layer))

            return hook

        for name, module in self.unet.named_modules():
            tracer.append(module.register_forward_pre_hook(enter(name)))
            tracer.append(module.register_forward_hook(leave(name)))

    def hook(self, names: list[str]) -> None:
        """Share these modules (outermost prefix modules, as `prefix_modules` gives them)."""
        self.remove()
        self.modules = names
        for name in names:
            module = self.unet.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._reduce, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._expand))

    def remove(self) -> None:
        """Remove every hook (a pending trace included); the U-Net is as loaded."""
        for handle in self._handles + self._tracer:
            handle.remove()
        self._handles, self._tracer, self.modules = [], [], []

    def share(self, rows: Tensor) -> None:
        """Share the prefix among the rows of the next U-Net calls that belong to the same image."""
        images, inverse = torch.unique(rows, return_inverse=True)
        if len(images) == len(rows) or not self.ready:
            self._plan = None
            return
        positions = torch.arange(len(rows), device=rows.device)
        first = torch.full((len(images),), len(rows), device=rows.device, dtype=positions.dtype)
        first = first.scatter_reduce(0, inverse, positions, reduce="amin")
        self._plan = (first, inverse)

    def stop(self) -> None:
        self._plan = self._saved_rows = None
        self._reduced = False

    def _reduce(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._plan is None:
            return None
        first, inverse = self._plan
        rows = len(inverse)

        leaves = pytree.tree_leaves((args, kwargs))
        if not any(isinstance(t, Tensor) and t.ndim and t.shape[0] == rows for t in leaves):
            return None

        def pick(t):
            return t[first] if isinstance(t, Tensor) and t.ndim and t.shape[0] == rows else t

        # the processors index recorded tensors by image: they see the representative rows' images
        self._saved_rows = self.controller.narrow_rows(first)
        self._reduced = True
        return pytree.tree_map(pick, args), pytree.tree_map(pick, kwargs)

    def _expand(self, module: nn.Module, args: tuple, output):
        if self._plan is None or not self._reduced:
            return None
        first, inverse = self._plan
        self.controller.restore_rows(self._saved_rows)
        self._saved_rows, self._reduced = None, False

        def spread(t):
            return t[inverse] if isinstance(t, Tensor) and t.ndim and t.shape[0] == len(first) else t

        return pytree.tree_map(spread, output)


__all__ = ["PrefixSharing", "prefix_modules"]
