"""DSMIL, CLAM (single- and multi-branch) and TransMIL written the way the published code runs them: one bag per step
(``x [1, n, D]``), plain module chains, every activation kept by autograd.

- DSMIL (github.com/binli123/dsmil-wsi as MHIM-MIL uses it): an embedding ``Linear + ReLU + Dropout``, the instance
  classifier, ``torch.sort`` of the instance logits for the critical instances, ``index_select``, the query network,
  ``softmax(Q q_max^T / sqrt(128))``, ``A^T V``, a ``Conv1d(C, C, E)``; loss ``0.5 CE(bag) + 0.5 CE(max)``.
- CLAM (github.com/mahmoodlab/CLAM): ``Attn_Net_Gated`` as a module chain, ``softmax`` over the bag, instance
  evaluation per class with ``topk`` and ``index_select``, a smooth top-1 SVM, ``0.7 CE + 0.3 instance``;
  ``clam_mb`` with a Python loop over its per-class classifiers.
- TransMIL (github.com/szc19990412/TransMIL) with the lucidrains ``NystromAttention``: square padding by
  ``torch.cat`` of the first tokens, ``F.pad`` in front to a multiple of the landmarks, einsum landmarks, the
  iterative pseudo-inverse, the residual convolution; PPEG by ``transpose``/``view``.

Sizes as published (E = 512; DSMIL queries 128; CLAM gates 256; TransMIL 8 heads, 256 landmarks). Left out, so
this baseline is if anything a little faster than the published code: CLAM's dropout inside the attention gates
(fastmil has none either), the published smooth-SVM class's extra bookkeeping, CLAM's predictions for logging.
Optimiser: AdamW for parity with fastmil's step (the published code uses Adam for CLAM and DSMIL, Lookahead(RAdam)
for TransMIL), torch's default per-parameter loop on the CPU. One optimiser step per bag, as batch size 1 trains; the
published code runs on a GPU (TransMIL in fp16): this CPU baseline has no CUDA counterpart here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PublishedDSMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, embed: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, embed), nn.ReLU(), nn.Dropout(dropout))
        self.fc = nn.Linear(embed, n_classes)
        self.q = nn.Sequential(nn.Linear(embed, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh())
        self.fcc = nn.Conv1d(n_classes, n_classes, kernel_size=embed)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats = self.embed(x[0])
        classes = self.fc(feats)
        queries = self.q(feats)
        _, m_indices = torch.sort(classes, 0, descending=True)
        q_max = self.q(torch.index_select(feats, dim=0, index=m_indices[0, :]))
        a = F.softmax(queries @ q_max.T / math.sqrt(queries.shape[1]), 0)
        bag = self.fcc((a.T @ feats)[None]).view(1, -1)
        max_prediction, _ = torch.max(classes, 0)
        return 0.5 * F.cross_entropy(bag, y) + 0.5 * F.cross_entropy(max_prediction[None], y)


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    margin = 1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return (torch.logsumexp(logits + margin, 1) - logits.gather(1, target[:, None])[:, 0]).mean()


class PublishedCLAM(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, multi_branch: bool = False, k_sample: int = 8,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU(), nn.Dropout(dropout))
        self.attention_a = nn.Sequential(nn.Linear(512, 256), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(512, 256), nn.Sigmoid())
        self.attention_c = nn.Linear(256, n_classes if multi_branch else 1)
        self.classifiers = (nn.ModuleList(nn.Linear(512, 1) for _ in range(n_classes)) if multi_branch
                            else nn.Linear(512, n_classes))
        self.instance_classifiers = nn.ModuleList(nn.Linear(512, 2) for _ in range(n_classes))
        self.multi_branch, self.k_sample, self.n_classes = multi_branch, k_sample, n_classes

    def _inst_eval(self, a: torch.Tensor, h: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
        top_p = torch.index_select(h, 0, torch.topk(a, self.k_sample)[1])
        top_n = torch.index_select(h, 0, torch.topk(-a, self.k_sample)[1])
        targets = torch.cat([torch.ones(self.k_sample), torch.zeros(self.k_sample)]).long()
        return smooth_top1_svm(classifier(torch.cat([top_p, top_n])), targets)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(x[0])
        a = self.attention_c(self.attention_a(h).mul(self.attention_b(h))).T  # [branches, n]
        a = F.softmax(a, dim=1)
        label = int(y)
        instance_loss = self._inst_eval(a[label if self.multi_branch else 0], h, self.instance_classifiers[label])
        m = a @ h
        if self.multi_branch:
            logits = torch.empty(1, self.n_classes)
            for c in range(self.n_classes):
                logits[0, c] = self.classifiers[c](m[c])
        else:
            logits = self.classifiers(m)
        return 0.7 * F.cross_entropy(logits, y) + 0.3 * instance_loss


def _pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (torch.max(abs_x.sum(dim=-1)) * torch.max(abs_x.sum(dim=-2)))
    eye = torch.eye(x.shape[-1], device=x.device)[None]
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


class _Nystrom(nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, landmarks: int = 256) -> None:
        super().__init__()
        self.heads, self.landmarks, self.scale = heads, landmarks, (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.1))
        self.res_conv = nn.Conv2d(heads, heads, (33, 1), padding=(16, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.landmarks
        if n % m:
            x = F.pad(x, (0, 0, m - n % m, 0), value=0)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        group = math.ceil(n / m)
        q_l = q.reshape(b, self.heads, m, group, -1).sum(3) / group
        k_l = k.reshape(b, self.heads, m, group, -1).sum(3) / group
        attn1 = torch.einsum("bhid,bhjd->bhij", q, k_l).softmax(-1)
        attn2 = torch.einsum("bhid,bhjd->bhij", q_l, k_l).softmax(-1)
        attn3 = torch.einsum("bhid,bhjd->bhij", q_l, k).softmax(-1)
        out = (attn1 @ _pinv(attn2)) @ (attn3 @ v)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * out.shape[-1])
        return self.to_out(out)[:, -n:]


class PublishedTransMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, 512))
        self.norm1, self.attn1 = nn.LayerNorm(512), _Nystrom()
        self.proj = nn.Conv2d(512, 512, 7, 1, 3, groups=512)
        self.proj1 = nn.Conv2d(512, 512, 5, 1, 2, groups=512)
        self.proj2 = nn.Conv2d(512, 512, 3, 1, 1, groups=512)
        self.norm2, self.attn2 = nn.LayerNorm(512), _Nystrom()
        self.norm = nn.LayerNorm(512)
        self.fc2 = nn.Linear(512, n_classes)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        n = h.shape[1]
        side = int(math.ceil(math.sqrt(n)))
        h = torch.cat([h, h[:, : side * side - n, :]], dim=1)
        h = torch.cat((self.cls_token.expand(1, -1, -1), h), dim=1)
        h = h + self.attn1(self.norm1(h))
        cls, feat = h[:, 0], h[:, 1:]
        grid = feat.transpose(1, 2).view(1, 512, side, side)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        h = torch.cat((cls.unsqueeze(1), grid.flatten(2).transpose(1, 2)), dim=1)
        h = h + self.attn2(self.norm2(h))
        return F.cross_entropy(self.fc2(self.norm(h)[:, 0]), y)


PUBLISHED = {"dsmil": PublishedDSMIL, "clam_sb": PublishedCLAM,
             "clam_mb": lambda in_dim: PublishedCLAM(in_dim, multi_branch=True), "transmil": PublishedTransMIL}


def published_steps(name: str, bags: list[torch.Tensor], labels: list[int]):
    """A zero-argument callable: one pass over ``bags`` (each ``[n, D]``) at batch size 1, one AdamW step per bag."""
    model = PUBLISHED[name](bags[0].shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    targets = [torch.tensor([label]) for label in labels]

    def run() -> None:
        model.train()
        for x, y in zip(bags, targets):
            loss = model.loss(x[None], y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return run
