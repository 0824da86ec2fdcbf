"""The plain module chain of published ABMIL code, as one training step: ``Linear -> ReLU -> Dropout``, the gated
attention as ``Linear/Tanh``, ``Linear/Sigmoid``, ``Linear`` with every ``N x hidden`` activation kept by autograd,
softmax, ``a @ h``, the classifier, cross-entropy, AdamW. One bag per step."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .mhim_research import ResearchABMIL


def chain_step(x: torch.Tensor, label: int = 1, n_classes: int = 2) -> Callable[[], None]:
    """A zero-argument callable: one training step of the chain on the bag ``x [N, D]``."""
    model = ResearchABMIL(x.shape[1], n_classes=n_classes).to(x.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    y = torch.tensor([label], device=x.device)

    def step() -> None:
        logits, *_ = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step
