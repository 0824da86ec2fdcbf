"""The instance embedding block of the MIL models: ``Linear(D -> E) -> ReLU -> Dropout(p)`` as one fused op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear_relu_dropout import check_dropout, linear_relu_dropout

__all__ = ["EmbedBlock"]


class EmbedBlock(nn.Module):
    """``forward(x [N, D]) -> [N, E]`` = ``Dropout(ReLU(Linear(x)))`` through
    :func:`fastmil.ops.linear_relu_dropout` (no stored ReLU output or dropout mask; see there).

    The ``Linear`` is registered as submodule ``"0"``, so the parameters keep the ``state_dict`` keys of
    ``nn.Sequential(Linear, ReLU, Dropout)`` (``0.weight``, ``0.bias``) and earlier checkpoints load unchanged.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        check_dropout(dropout)
        self.add_module("0", nn.Linear(in_dim, out_dim))
        self.dropout = dropout

    @property
    def linear(self) -> nn.Linear:
        return self._modules["0"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_relu_dropout(x, self.linear.weight, self.linear.bias, self.dropout, self.training)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """The block's ReLU and dropout alone, for vectors that are already embedded (MHIM's recycled tokens)."""
        return F.dropout(F.relu(x), self.dropout, self.training)

    def extra_repr(self) -> str:
        return f"relu, dropout={self.dropout}"
