"""A research-code-style MHIM-MIL step (ABMIL student and teacher), written the way published MIL code does it:

- the teacher pass as a plain module chain (every N x hidden activation materialised);
- masking with a host synchronisation and Python sets: ``topk(...).tolist()``, list comprehensions over all
  instances, ``random.sample``;
- gather/cat copies of the bag: ``h[kept]``, ``h[masked]``, ``torch.cat([kept, tokens])``;
- the recycle network as ``nn.MultiheadAttention`` with explicit key/value projections of every masked instance;
- the EMA teacher as a Python loop over parameters.

One bag per step (batch size 1), as such code trains. Numbers are not expected to equal fastmil's (other RNG use,
other pooling implementation); the algorithm and the work per step are the same.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn


class ResearchABMIL(nn.Module):
    def __init__(self, in_dim: int, embed_dim: int = 512, attn_dim: int = 128, n_classes: int = 2,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_V = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh())
        self.attention_U = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Sigmoid())
        self.attention_weights = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def attend(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attention_weights(self.attention_V(h) * self.attention_U(h)).T  # [1, n]
        a = F.softmax(a, dim=1)
        return a @ h, a  # [1, E], [1, n]

    def forward(self, x: torch.Tensor):
        h = self.fc(x)
        z, a = self.attend(h)
        return self.classifier(z), a, h, z


class ResearchRecycle(nn.Module):
    def __init__(self, dim: int, n_tokens: int = 5, n_heads: int = 8) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_tokens, dim), requires_grad=False)
        self.norm_q, self.norm_x = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)

    def forward(self, masked: torch.Tensor) -> torch.Tensor:
        x = self.norm_x(masked)[None]
        out, _ = self.attn(self.norm_q(self.queries)[None], x, x)
        return out[0]


class ResearchMHIM:
    """Student, teacher, recycle network and optimiser; ``step(x [N, D], y [1])`` runs one training step."""

    def __init__(self, in_dim: int, n_classes: int = 2, momentum: float = 0.9997, high_ratio: float = 0.03,
                 random_ratio: float = 0.8) -> None:
        self.student = ResearchABMIL(in_dim, n_classes=n_classes)
        self.teacher = ResearchABMIL(in_dim, n_classes=n_classes)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.recycle = ResearchRecycle(512)
        params = list(self.student.parameters()) + [p for p in self.recycle.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4)
        self.momentum, self.high_ratio, self.random_ratio = momentum, high_ratio, random_ratio

    def _masks(self, scores: torch.Tensor) -> tuple[list[int], list[int]]:
        n = scores.shape[0]
        salient = set(torch.topk(scores, math.ceil(self.high_ratio * n)).indices.tolist())  # host sync
        rest = [i for i in range(n) if i not in salient]
        masked = random.sample(rest, int(self.random_ratio * len(rest)))
        masked_set = set(masked)
        kept = [i for i in rest if i not in masked_set]
        return kept, masked

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.student.train()
        self.teacher.eval()
        with torch.no_grad():
            _, a_t, h_t, z_t = self.teacher(x)
            scores = F.softmax(self.teacher.classifier(a_t.T * h_t), dim=-1).max(-1).values
        kept, masked = self._masks(scores)
        h = self.student.fc(x)
        tokens = self.recycle(h[torch.tensor(masked, dtype=torch.long)])
        bag = torch.cat([h[torch.tensor(kept, dtype=torch.long)], tokens])
        z, _ = self.student.attend(bag)
        logits = self.student.classifier(z)
        consistency = -(F.softmax(z_t / 0.1, -1) * F.log_softmax(z, -1)).sum(-1).mean()
        loss = F.cross_entropy(logits, y) + 0.5 * consistency
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for p_t, p_s in zip(self.teacher.parameters(), self.student.parameters()):
                p_t.data.mul_(self.momentum).add_(p_s.data, alpha=1 - self.momentum)
            self.recycle.queries.data.mul_(0.9999).add_(tokens.detach(), alpha=1e-4)
        return float(loss.detach())


def python_set_selection(scores: torch.Tensor, high_ratio: float, random_ratio: float, seed: int):
    """The masking of research MHIM code for one bag: top-k with a host sync, Python sets, ``random.sample``;
    returns the three masks as bool tensors."""
    random.seed(seed)
    n = scores.shape[0]
    salient = set(torch.topk(scores, math.ceil(high_ratio * n)).indices.tolist())
    rest = [i for i in range(n) if i not in salient]
    masked = set(random.sample(rest, int(random_ratio * len(rest))))
    keep = torch.tensor([i not in salient and i not in masked for i in range(n)])
    return keep, torch.tensor([i in salient for i in range(n)]), torch.tensor([i in masked for i in range(n)])
