"""A research-code-style MHIM-MIL step (ABMIL student and teacher), written the way published MIL code does it; its
data path follows the published MHIM-MIL code (Tang et al., github.com/DearCaat/MHIM-MIL, ``modules/mhim.py`` with
``mhim_modules/masking.py`` and ``mhim_modules/merge.py``):

- the teacher pass as a plain module chain (every N x hidden activation materialised);
- the salient instances chosen with a host synchronisation and Python sets: ``topk(...).tolist()``, sets over
  ``range(N)``, an index tensor from their difference (``select_mask_fn``);
- gather/cat copies of the bag, as ``torch.gather`` with the index repeated over the feature dimension: the bag
  without its salient instances (``mask_fn``), then its random split into kept and masked instances by ``argsort``
  of uniform noise (``Merge.masking``), then ``torch.cat([kept, tokens])``;
- the recycle network with explicit key/value projections of every masked instance (``Merge``'s ``MCA``);
- the EMA teacher as a Python loop over parameters.

One bag per step (batch size 1), as such code trains. Numbers are not expected to equal fastmil's (other RNG use,
other pooling implementation); the algorithm and the work per step are the same: DESIGN.md's counts (the published
``Merge`` keeps ``int(0.2 L)`` rows, this step ``L - floor(0.8 L)``) and no dropout inside the recycle network (the
published ``Merge`` defaults to 0.1 on its attention and output; fastmil's has none). Until 2026-11-30 this step
gathered the kept and the masked rows straight from the bag with ``h[index]``, drew the random split with
``random.sample`` and ran the recycle network as ``nn.MultiheadAttention``: measured at 10k x 1024, the published
gathers add ~5% to the step and the published ``MCA`` takes ~5% off it (``nn.MultiheadAttention`` projects
queries, keys and values with biases and copies the packed projections).
"""
from __future__ import annotations

import math

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
    """The published recycle network (``Merge`` with its ``MCA``): one LayerNorm for instances and queries, explicit
    key/value projections of every masked instance (``to_kv``, no bias, split into views), 8 heads of 64,
    ``softmax(q k^T / 8) v`` per head, the output projection."""

    def __init__(self, dim: int, n_tokens: int = 5, n_heads: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = n_heads, dim // n_heads
        self.queries = nn.Parameter(torch.randn(n_tokens, dim), requires_grad=False)
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(0, 1)  # [n, dim] -> [heads, n, head_dim]

    def forward(self, masked: torch.Tensor) -> torch.Tensor:
        keys, values = self.to_kv(self.norm(masked)).chunk(2, dim=-1)
        q = self.to_q(self.norm(self.queries))
        attn = torch.softmax(self._split(q) @ self._split(keys).transpose(1, 2) / math.sqrt(self.head_dim), -1)
        return self.to_out((attn @ self._split(values)).transpose(0, 1).flatten(1))


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

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.student.train()
        self.teacher.eval()
        with torch.no_grad():
            _, a_t, h_t, z_t = self.teacher(x)
            scores = F.softmax(self.teacher.classifier(a_t.T * h_t), dim=-1).max(-1).values
        order, n_rest, n_kept = published_selection(scores, self.high_ratio, self.random_ratio)
        h = self.student.fc(x)[None]  # [1, N, E], batch size 1
        rest = gather_rows(h, order[:n_rest])  # the salient instances dropped: a copy of the rest of the bag
        shuffle = torch.argsort(torch.rand(n_rest, device=x.device))  # then the random split of the rest
        kept, masked = gather_rows(rest, shuffle[:n_kept]), gather_rows(rest, shuffle[n_kept:])
        tokens = self.recycle(masked[0])
        bag = torch.cat([kept[0], tokens])
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


def published_selection(scores: torch.Tensor, high_ratio: float,
                        random_ratio: float) -> tuple[torch.Tensor, int, int]:
    """The salient selection of the published code for one bag: ``topk(...).tolist()`` (a host sync), Python sets
    over ``range(N)``, the index tensor built from the set difference. Returns ``(order [N], n_rest, n_kept)``:
    ``order`` lists the non-salient instances, then the salient ones; ``n_kept`` of the ``n_rest`` non-salient
    instances stay after the random masking (the same counts as ``fastmil.ops.saliency_mask``)."""
    n = scores.shape[0]
    salient = torch.topk(scores, math.ceil(high_ratio * n)).indices
    rest = set(range(n)).difference(set(salient.tolist()))
    order = torch.cat([torch.tensor(list(rest), dtype=torch.long, device=scores.device), salient])
    n_rest = len(rest)
    return order, n_rest, n_rest - int(random_ratio * n_rest)


def gather_rows(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``h [1, N, E]`` the way the published code gathers them: ``torch.gather`` with the index
    repeated over the feature dimension (an int64 index tensor the size of the copy)."""
    return torch.gather(h, 1, index[None, :, None].repeat(1, 1, h.shape[2]))


def python_set_selection(scores: torch.Tensor, high_ratio: float, random_ratio: float, seed: int):
    """The masking of the research step for one bag (:func:`published_selection`, then the random split of the rest
    by ``argsort`` of uniform noise); returns the kept, masked and salient instance indices."""
    order, n_rest, n_kept = published_selection(scores, high_ratio, random_ratio)
    generator = torch.Generator(scores.device).manual_seed(seed)  # its own: the global generator is left alone
    shuffle = order[:n_rest][torch.argsort(torch.rand(n_rest, device=scores.device, generator=generator))]
    return shuffle[:n_kept], shuffle[n_kept:], order[n_rest:]
