"""Resumable training state in safetensors + JSON (no pickle, like every file this project reads)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.safetensors"
META_FILE = "state.json"


def save_training_state(
    folder: Path,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Weights of every module, the optimizer's moments and `meta` (step, settings), atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{index}.{slot}"] = torch.as_tensor(value).contiguous().cpu()
    tmp = folder / (STATE_FILE + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / STATE_FILE)  # a crash mid-write leaves the previous state intact
    meta = {**meta, "param_groups": opt["param_groups"]}
    (folder / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=2))
    os.replace(folder / (META_FILE + ".tmp"), folder / META_FILE)


def load_training_state(
    folder: Path, modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None
) -> dict[str, Any] | None:
    """Restores what `save_training_state` wrote; None when the folder holds no state yet."""
    if not (folder / STATE_FILE).is_file():
        return None
    tensors = load_file(str(folder / STATE_FILE))
    meta: dict[str, Any] = json.loads((folder / META_FILE).read_text())
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict(
            {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        )
    if optimizer is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, slot = key.split(".", 2)
                state.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


class EMA:
    """Exponential moving average of weights (the LDM paper samples from EMA weights)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)


class EMAModule(torch.nn.Module):
    """Lets an EMA be saved and restored like a module's weights."""

    def __init__(self, ema: EMA) -> None:
        super().__init__()
        self.ema = ema

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.ema.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        self.ema.load_state_dict(state)
