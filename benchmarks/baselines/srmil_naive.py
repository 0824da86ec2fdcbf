"""A straightforward torch SRMIL step, the way graph MIL is commonly written: the baseline of the SRMIL benchmarks.

Same architecture and losses as ``method: srmil`` on ``model: graphmil`` (reformer, 2 graph-attention encoder layers
of 4 x 64, mask token, decoder back to D, supernode readout, MLP head; 0.2 (CE_masked + CE_clean) + 1.8 recon),
written without fastmil's ops:

- the graph is a prebuilt edge list ``(src, dst)`` with self loops (from the same stencil table);
- graph attention gathers every edge's source features (``E x C``), softmax over each destination by scatter
  (``scatter_reduce`` max, ``index_add`` sums), messages summed with ``index_add``; autograd does the backward;
- the masked view is a copy of the bag with the mask token written into its rows, and each view goes through the
  reformer; the decoder's last layer projects to D and then aggregates (``E x D`` messages).

This is a benchmark baseline, not library code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def edge_list(nbr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src [E], dst [E])`` of the stencil table plus self loops: ``dst`` attends to ``src``."""
    n, k = nbr.shape
    rows = torch.arange(n, device=nbr.device)[:, None].expand(n, k)
    keep = nbr >= 0
    src = torch.cat([nbr[keep], torch.arange(n, device=nbr.device)])
    dst = torch.cat([rows[keep], torch.arange(n, device=nbr.device)])
    return src, dst


class NaiveGATLayer(nn.Module):
    def __init__(self, in_dim: int, heads: int, head_dim: int, *, final: bool = False) -> None:
        super().__init__()
        out = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.proj = nn.Linear(in_dim, out, bias=False)
        self.att_src = nn.Parameter(torch.randn(heads, head_dim) * 0.1)
        self.att_dst = nn.Parameter(torch.randn(heads, head_dim) * 0.1)
        self.bias = nn.Parameter(torch.zeros(out))
        self.final = final
        if not final:
            self.residual = nn.Identity() if in_dim == out else nn.Linear(in_dim, out, bias=False)
            self.norm, self.act = nn.LayerNorm(out), nn.PReLU()

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        z = self.proj(x).view(n, self.heads, self.head_dim)
        a_src, a_dst = (z * self.att_src).sum(-1), (z * self.att_dst).sum(-1)  # [N, H]
        e = F.leaky_relu(a_src[src] + a_dst[dst], 0.2)  # [E, H]
        top = torch.full((n, self.heads), float("-inf"), device=x.device).scatter_reduce(
            0, dst[:, None].expand_as(e), e, "amax", include_self=True)
        p = torch.exp(e - top[dst])
        denom = torch.zeros(n, self.heads, device=x.device).index_add(0, dst, p)
        alpha = p / denom[dst]
        messages = z[src] * alpha[..., None]  # [E, H, C]
        out = torch.zeros_like(z).index_add(0, dst, messages).reshape(n, -1) + self.bias
        if self.final:
            return out
        return self.act(self.norm(out + self.residual(x)))


class NaiveSRMIL(nn.Module):
    def __init__(self, dim: int, n_classes: int = 2, heads: int = 4, head_dim: int = 64) -> None:
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.reformer = nn.Linear(dim, dim)
        self.encoder = nn.ModuleList([NaiveGATLayer(dim, heads, head_dim), NaiveGATLayer(width, heads, head_dim)])
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.dec_proj = nn.Linear(width, width)
        self.dec_token = nn.Parameter(torch.zeros(width))
        self.decoder = nn.ModuleList([NaiveGATLayer(width, heads, head_dim), NaiveGATLayer(width, 1, dim, final=True)])
        self.query = nn.Parameter(torch.randn(heads, head_dim) / math.sqrt(head_dim))
        self.head = nn.Sequential(nn.Linear(head_dim, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, n_classes))
        self.dropout = nn.Dropout(0.25)

    def encode(self, x, src, dst):
        h = self.reformer(x)
        for layer in self.encoder:
            h = layer(h, src, dst)
        return self.dropout(h)

    def classify(self, h):
        z = h.view(h.shape[0], self.heads, self.head_dim)
        a = torch.softmax((z * self.query).sum(-1) / math.sqrt(self.head_dim), 0)  # [N, H], one bag
        return self.head((a[..., None] * z).sum(0).mean(0, keepdim=True))

    def step(self, x: torch.Tensor, y: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        masked = torch.randperm(n, device=x.device)[: int(0.7 * n)]
        view = x.clone()
        view[masked] = self.mask_token
        h_masked = self.encode(view, src, dst)
        d = self.dec_proj(h_masked).clone()
        d[masked] = self.dec_token
        for layer in self.decoder:
            d = layer(d, src, dst)
        recon = (1 - F.cosine_similarity(d[masked], x[masked], dim=1)).mean()
        ce_masked = F.cross_entropy(self.classify(h_masked), y)
        ce_clean = F.cross_entropy(self.classify(self.encode(x, src, dst)), y)
        return 0.2 * (ce_masked + ce_clean) + 1.8 * recon
