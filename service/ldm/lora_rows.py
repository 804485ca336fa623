"""LoRA deltas added per row of a batched call, unmerged (the S-LoRA / Punica approach).

Merging an adapter into the weights (W' = W + s·BA) serves one adapter at a time. Kept apart, the
delta `s·B(A x)` can be added to only the rows of the batch whose request asked for it, so requests
with different adapters, or none, share one UNet call. The adapted Linear / Conv2d layers are
swapped, at an adapter's first use, for subclasses that share the original parameters (the state
dict is unchanged) and add the deltas of the adapters active for the current call; with none active
they cost one attribute test.

Rows per adapter are gathered with `index_select`, run through A then B, scaled per row (the
request's weight; the file's alpha / rank is folded into B at load) and scattered back with
`index_add_`. On the CPU this cost the same CPU time as one batched matmul over per-row gathered A
and B (Punica's BGMV; bench/lora.py times both), and it serves convolutions (LoCon) unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora_keys import Part
from .winograd import conv3x3

if TYPE_CHECKING:
    from .lora import LoraAdapter

# Per UNet row (or per member), the adapters it uses with their weights.
RowLoras = Sequence[Sequence[tuple["LoraAdapter", float]]]


@dataclass(frozen=True)
class RowGroup:
    """The rows of one call that use one adapter; `weights` (n,) per row, or () for every row."""

    adapter: LoraAdapter
    rows: Tensor | None  # (n,) int64 row indices; None: every row of the call
    weights: Tensor


def group_rows(rows: RowLoras, device: torch.device, dtype: torch.dtype) -> tuple[RowGroup, ...]:
    """Per-row adapter lists -> one group per adapter. Weight-0 entries are dropped, so such a row
    computes exactly what it would without the adapter; repeats of an adapter in a row add up."""
    by_adapter: dict[int, tuple[LoraAdapter, dict[int, float]]] = {}
    for row, pairs in enumerate(rows):
        for adapter, weight in pairs:
            weights = by_adapter.setdefault(id(adapter), (adapter, {}))[1]
            weights[row] = weights.get(row, 0.0) + float(weight)
    groups = []
    for adapter, weights in by_adapter.values():
        used = {r: w for r, w in weights.items() if w != 0.0}
        if not used:
            continue
        index = torch.tensor(list(used), dtype=torch.int64).to(device, non_blocking=True)
        values = torch.tensor(list(used.values()), dtype=dtype).to(device, non_blocking=True)
        groups.append(RowGroup(adapter, index, values))
    return tuple(groups)


def all_rows(
    loras: Sequence[tuple[LoraAdapter, float]], device: torch.device, dtype: torch.dtype
) -> tuple[RowGroup, ...]:
    """Every row of the call with the same adapters (text encoding of one prompt)."""
    total: dict[int, tuple[LoraAdapter, float]] = {}
    for adapter, weight in loras:
        total[id(adapter)] = (adapter, total.get(id(adapter), (adapter, 0.0))[1] + float(weight))
    return tuple(
        RowGroup(a, None, torch.tensor(w, dtype=dtype, device=device)) for a, w in total.values() if w != 0.0
    )


class LoraRuntime:
    """The adapters in effect in one module tree (the UNet or the text model) during a call.

    Set for the length of one forward call (`active`), so one thread at a time runs the tree, as
    a worker's engine loop does; loading adapters on other threads is fine.
    """

    def __init__(self, root: nn.Module, part: Part) -> None:
        self.root = root
        self.part = part
        self.groups: tuple[RowGroup, ...] = ()
        self._wrapped: set[str] = set()  # layer paths swapped
        self._installed: set[str] = set()  # adapter uids whose layers are all swapped

    @classmethod
    def of(cls, root: nn.Module, part: Part) -> LoraRuntime:
        """The runtime of a module tree, created on first use and kept on the module: every
        TextConditioner or engine over the same modules shares the same wrappers."""
        runtime = root.__dict__.get("_lora_runtime")
        if runtime is None:
            runtime = cls(root, part)
            root.__dict__["_lora_runtime"] = runtime
        assert isinstance(runtime, LoraRuntime)
        return runtime

    def install(self, adapter: LoraAdapter) -> None:
        """Swaps the layers the adapter touches for LoRA-aware ones (once per layer)."""
        if adapter.uid in self._installed:
            return
        for path in adapter.layers(self.part).keys() - self._wrapped:
            parent_path, _, child = path.rpartition(".")
            parent = self.root.get_submodule(parent_path)
            layer = getattr(parent, child)
            setattr(parent, child, _wrap(layer, self, path))
            self._wrapped.add(path)
        self._installed.add(adapter.uid)

    @contextmanager
    def active(self, groups: tuple[RowGroup, ...]) -> Iterator[None]:
        for group in groups:
            self.install(group.adapter)
        self.groups = groups
        try:
            yield
        finally:
            self.groups = ()


def _wrap(layer: nn.Module, runtime: LoraRuntime, path: str) -> nn.Module:
    """A LoRA-aware twin of a Linear / Conv2d sharing its parameters (the state dict is unchanged)."""
    cls: type[nn.Module]
    if isinstance(layer, LoraLinear | LoraConv2d):
        return layer
    if isinstance(layer, nn.Linear):
        cls = LoraLinear
    elif isinstance(layer, nn.Conv2d):
        cls = LoraConv2d
    else:
        raise TypeError(f"{path}: a LoRA cannot adapt a {type(layer).__name__}")
    twin = cls.__new__(cls)
    twin.__dict__.update(layer.__dict__)  # parameters, buffers, hooks, conv settings: the same objects
    twin._parameters = dict(layer._parameters)
    twin.__dict__["lora_runtime"] = runtime
    twin.__dict__["lora_path"] = path
    return twin


def _add_deltas(y: Tensor, x: Tensor, runtime: LoraRuntime, path: str, delta: Any) -> Tensor:
    """y + Σ_a w_row · B_a(A_a x_row) over the rows of each active adapter."""
    for group in runtime.groups:
        layer = group.adapter.layers(runtime.part).get(path)
        if layer is None:
            continue
        rows = x if group.rows is None else x.index_select(0, group.rows)  # (n, ...)
        h = delta(rows, layer.down, None)  # (n, ..., r)
        w = group.weights
        h = h * (w if w.ndim == 0 else w.view(-1, *([1] * (h.ndim - 1))))
        d = delta(h, layer.up, "up")
        # In place: y is this layer's fresh output, which no backward pass needs.
        if group.rows is None:
            y.add_(d)
        else:
            y.index_add_(0, group.rows, d)
    return y


class LoraLinear(nn.Linear):
    lora_runtime: LoraRuntime
    lora_path: str

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_runtime.groups:
            return y
        return _add_deltas(y, x, self.lora_runtime, self.lora_path, lambda h, w, _: F.linear(h, w))


class LoraConv2d(nn.Conv2d):
    lora_runtime: LoraRuntime
    lora_path: str

    def forward(self, x: Tensor) -> Tensor:
        if not self.lora_runtime.groups:
            return conv3x3(self, x)  # Winograd where the twin's original took it (winograd.py)
        y = self._conv_forward(x, self.weight, self.bias)  # with a delta: the plain conv
        return _add_deltas(y, x, self.lora_runtime, self.lora_path, self._delta)

    def _delta(self, h: Tensor, w: Tensor, up: str | None) -> Tensor:
        # A has this layer's kernel, stride and padding (kohya's LoCon); B is 1x1.
        if up:
            return F.conv2d(h, w)
        return F.conv2d(h, w, None, self.stride, self.padding, self.dilation)
