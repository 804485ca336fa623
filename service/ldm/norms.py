"""Group normalisation of the UNet (openaimodel's `normalization`): 32 groups, float32 statistics."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 (openaimodel's `GroupNorm32`): means and
    variances over whole feature maps lose too much precision in half precision."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """32 groups as everywhere in the ADM/LDM code; ResBlocks use eps 1e-5, transformers 1e-6."""
    return GroupNorm32(32, channels, eps=eps)
