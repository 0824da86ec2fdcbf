"""TransMIL (Shao et al., NeurIPS 2021) on packed ragged bags.

Per bag (its unmasked instances, then any extra tokens), as the published model:

1. embed ``Linear(D -> E) + ReLU`` (+ ``Dropout``, default 0 as published);
2. square the sequence: with ``s = ceil(sqrt(n))``, append the bag's first ``s^2 - n`` tokens again, so the ``n``
   tokens (and the repeats) fill an ``s x s`` grid row by row; put a learnt class token in front;
3. two transformer layers ``x + attention(LayerNorm(x))`` with 8 heads of ``E / 8`` and Nystrom attention
   (256 landmarks by default, ``E / 2`` at the published ``E = 512``: segment means of the zero-front-padded
   queries and keys; 6 Newton-Schulz iterations of the Moore-Penrose pseudo-inverse; a depthwise residual
   convolution of the values along the sequence, kernel 33), between them PPEG: depthwise 7x7, 5x5 and 3x3
   convolutions of the grid added to it;
4. ``LayerNorm``, the class token's output -> ``Linear(E -> C)``.

``attention: exact`` replaces the Nystrom approximation by exact softmax attention
(:func:`torch.nn.functional.scaled_dot_product_attention`, fused), the rest unchanged.

Packing: the row-wise work (embedding, LayerNorms, the query/key/value and output projections: nearly all the FLOPs
outside attention) runs once over the concatenated sequences of all bags; the attention core and PPEG loop over the
bags' row ranges, each bag exactly as alone (no bag is padded to the longest). Memory is linear in ``n``: the
largest activations are the ``[heads, n, landmarks]`` attention maps (100k instances, E = 512: ~0.8 GB each in fp32).

Attention for heatmaps and MHIM: the class token's exact softmax attention over the bag's grid tokens in the last
layer (its query against their keys, itself left out, averaged over heads), with the weights of repeated (padding)
tokens added to the token they repeat: ``[n]``, non-negative, summing to one per bag (less the share of MHIM's
extra tokens when there are some). It is computed from the layer's own query/key projections (one ``[n]`` row per
head); the layer's Nystrom row of the class token approximates a softmax that also covers the class token itself
(and, inside the approximation, the zero padding). MHIM's class-aware instance probability uses
it with the final token features: ``W_cls (a_i h_i) + b``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._segments import rows_per_bag
from ..ops._tiles import check_offsets, host_offsets
from .base import EmbeddedMIL, check_sizes, weighted_instance_logits
from .embed import EmbedBlock
from .output import MILOutput
from .registry import register_model

__all__ = ["PPEG", "NystromAttention", "TransMIL", "moore_penrose_pinv", "nystrom_attention"]


def moore_penrose_pinv(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse of ``x [..., m, m]`` (the Nystromformer's Newton-Schulz variant):
    ``z_0 = x^T / (max column sum * max row sum)`` over the whole tensor, then ``z <- z (13 I - xz (15 I - xz (7 I -
    xz))) / 4``."""
    magnitude = x.abs()
    z = x.transpose(-1, -2) / (magnitude.sum(-1).amax() * magnitude.sum(-2).amax())
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: int,
                      iterations: int) -> torch.Tensor:
    """Nystrom approximation of ``softmax(q k^T) v`` for one sequence. ``q, k, v [heads, L, d]`` with ``L`` a
    multiple of ``landmarks`` (the caller front-pads with zero rows) and ``q`` already scaled; landmarks are the
    means of ``L / landmarks`` consecutive rows. Returns ``[heads, L, d]``."""
    heads, length, dim = q.shape
    group = length // landmarks
    q_marks = q.reshape(heads, landmarks, group, dim).mean(2)
    k_marks = k.reshape(heads, landmarks, group, dim).mean(2)
    kernel_1 = torch.softmax(q @ k_marks.transpose(1, 2), -1)  # [heads, L, m]
    kernel_2 = torch.softmax(q_marks @ k_marks.transpose(1, 2), -1)  # [heads, m, m]
    kernel_3 = torch.softmax(q_marks @ k.transpose(1, 2), -1)  # [heads, m, L]
    return (kernel_1 @ moore_penrose_pinv(kernel_2, iterations)) @ (kernel_3 @ v)


class NystromAttention(nn.Module):
    """Multi-head attention of TransMIL's layers (module docstring): ``to_qkv`` without bias, ``to_out`` with
    dropout, the depthwise residual convolution of the values. ``forward(x [T, E], edges)`` attends within each
    sequence ``edges[b]:edges[b+1]`` of the packed rows ``x``; ``class_attention(qkv, lo, hi)`` is the exact softmax
    attention of row ``lo`` (the class token) over rows ``lo + 1:hi``, averaged over heads."""

    def __init__(self, dim: int, heads: int, landmarks: int, iterations: int, dropout: float, exact: bool,
                 residual_kernel: int = 33) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} must be a multiple of heads {heads}")
        self.heads, self.landmarks, self.iterations, self.exact = heads, landmarks, iterations, exact
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(0, 1)  # [L, E] -> [heads, L, d]

    def _one(self, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv [L, 3E]`` of one sequence -> its attention output ``[L, E]`` (before ``to_out``). The attention core
        runs outside autocast, in fp32 for half-precision ``qkv`` (the iterative pseudo-inverse and the landmark
        kernels lose too much in bf16), and returns ``qkv``'s dtype."""
        dtype = qkv.dtype
        with torch.autocast(qkv.device.type, enabled=False):
            if dtype in (torch.float16, torch.bfloat16):
                qkv = qkv.float()
            length = qkv.shape[0]
            pad = 0 if self.exact else (-length) % self.landmarks
            if pad:  # zero rows in front (to_qkv has no bias: they are the projections of zero inputs)
                qkv = torch.cat([qkv.new_zeros(pad, qkv.shape[1]), qkv])
            q, k, v = (self._split(t) for t in qkv.chunk(3, -1))
            if self.exact:
                out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
            else:
                out = nystrom_attention(q * q.shape[-1] ** -0.5, k, v, self.landmarks, self.iterations)
            residual = self.residual
            out = out + F.conv2d(v[None], residual.weight.to(v.dtype), None, residual.stride, residual.padding,
                                 residual.dilation, residual.groups)[0]
            return out[:, pad:].transpose(0, 1).flatten(1).to(dtype)

    def forward(self, x: torch.Tensor, edges: list[int], *, return_qkv: bool = False):
        """``x [T, E]`` -> ``[T, E]`` (and the projections ``qkv [T, 3E]`` with ``return_qkv``)."""
        qkv = self.to_qkv(x)
        out = self.to_out(torch.cat([self._one(qkv[lo:hi]) for lo, hi in zip(edges[:-1], edges[1:])]))
        return (out, qkv) if return_qkv else out

    def class_attention(self, qkv: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``[hi - lo - 1]``: the exact softmax attention of row ``lo`` (the class token) over rows ``lo + 1:hi``, from
        the layer's projections ``qkv`` (``forward(..., return_qkv=True)``), averaged over heads; fp32 (fp64 for
        fp64)."""
        dim = qkv.shape[1] // 3
        acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        with torch.autocast(qkv.device.type, enabled=False):
            q = self._split(qkv[lo : lo + 1, :dim].to(acc))  # [heads, 1, d]
            k = self._split(qkv[lo + 1 : hi, dim : 2 * dim].to(acc))  # [heads, n, d]
            return torch.softmax((k @ q[:, 0, :, None])[..., 0] * q.shape[-1] ** -0.5, -1).mean(0)


class PPEG(nn.Module):
    """Pyramid position encoding generator: a ``s x s`` grid of tokens ``g`` -> ``g + conv7(g) + conv5(g) + conv3(g)``
    (depthwise, with bias); the class token passes unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, edges: list[int]) -> torch.Tensor:
        parts = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            side = math.isqrt(hi - lo - 1)
            grid = x[lo + 1 : hi].T.reshape(1, x.shape[1], side, side)
            grid = grid + sum(conv(grid) for conv in self.convs)
            parts += [x[lo : lo + 1], grid[0].flatten(1).T]
        return torch.cat(parts)


class _TransLayer(nn.Module):
    def __init__(self, dim: int, attention: NystromAttention) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attention

    def forward(self, x: torch.Tensor, edges: list[int], *, return_qkv: bool = False):
        """``x + attention(LayerNorm(x))`` (and the attention's projections ``qkv`` with ``return_qkv``)."""
        if not return_qkv:
            return x + self.attn(self.norm(x), edges)
        attended, qkv = self.attn(self.norm(x), edges, return_qkv=True)
        return x + attended, qkv


@register_model("transmil")
class TransMIL(EmbeddedMIL):
    """TransMIL on packed bags (module docstring). ``forward(bags)`` or ``forward(features [N, D], offsets [B+1],
    mask [N] | None)`` -> ``(logits [B, C], attention [N])``; ``forward_all`` -> :class:`MILOutput` with the class
    token's output as ``bag_embedding [B, E]`` and the final token features of the instances as
    ``instance_embedding`` ``[N, E]`` (zero on masked rows)."""

    @dataclass
    class Config:
        """The ``model:`` config section of TransMIL."""

        name: str = "transmil"
        embed_dim: int = 512
        heads: int = 8
        landmarks: int = 256  # the published number (E / 2 at the published E = 512)
        pinv_iterations: int = 6
        attention: Literal["nystrom", "exact"] = "nystrom"
        dropout: float = 0.0  # of the embedding block (the published _fc1 has none; MHIM-MIL's TransMIL 0.25)
        attn_dropout: float = 0.1  # of the attention output projection (published)

        def __post_init__(self) -> None:
            check_sizes(embed_dim=self.embed_dim, heads=self.heads, landmarks=self.landmarks,
                        pinv_iterations=self.pinv_iterations, dropout=self.dropout)
            check_sizes(dropout=self.attn_dropout)
            if self.embed_dim % self.heads:
                raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of heads {self.heads}")
            if self.attention not in ("nystrom", "exact"):
                raise ValueError(f"attention must be nystrom or exact, got {self.attention!r}")

    def __init__(self, in_dim: int, embed_dim: int = 512, n_classes: int = 2, heads: int = 8,
                 landmarks: int = 256, pinv_iterations: int = 6, attention: str = "nystrom",
                 dropout: float = 0.0, attn_dropout: float = 0.1) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.embed = EmbedBlock(in_dim, embed_dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, embed_dim))
        exact = attention == "exact"
        self.layer1 = _TransLayer(embed_dim, NystromAttention(embed_dim, heads, landmarks, pinv_iterations,
                                                              attn_dropout, exact))
        self.ppeg = PPEG(embed_dim)
        self.layer2 = _TransLayer(embed_dim, NystromAttention(embed_dim, heads, landmarks, pinv_iterations,
                                                              attn_dropout, exact))
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, n_classes)

    @classmethod
    def from_config(cls, config: Config, in_dim: int, n_classes: int) -> TransMIL:
        return cls(in_dim, embed_dim=config.embed_dim, n_classes=n_classes, heads=config.heads,
                   landmarks=config.landmarks, pinv_iterations=config.pinv_iterations, attention=config.attention,
                   dropout=config.dropout, attn_dropout=config.attn_dropout)

    def _sequences(self, h: torch.Tensor, bounds: list[int], mask: torch.Tensor | None, tokens: torch.Tensor | None,
                   token_valid: torch.Tensor | None) -> tuple[torch.Tensor, list[int], list[tuple[torch.Tensor, ...]]]:
        """The packed sequences ``[T, E]`` (per bag: class token, its unmasked rows, its valid tokens, the repeats
        that square it) and their edges; per bag ``(rows, grid_rows, grid_positions)``: its unmasked rows of ``h``
        (the first entries of its grid, in order) and, for every grid position holding a row or a repeat of one,
        that row and the position (the grid's order is known on the host: no synchronisation)."""
        parts, edges, placed = [], [0], []
        valid = None if token_valid is None else token_valid.tolist()
        for b, rows in enumerate(rows_per_bag(mask, bounds, h.device)):
            n_rows = rows.numel()
            seq = [h[rows]]
            if tokens is not None and (valid is None or valid[b]):
                seq.append(tokens[b].to(h.dtype))
            body = torch.cat(seq)
            n = body.shape[0]
            side = math.isqrt(n - 1) + 1 if n > 0 else 1
            repeats = [j % n for j in range(side * side - n)] if n > 0 else []
            if n == 0:  # nothing to attend to: the class token over one zero token
                body = h.new_zeros(1, h.shape[1])
            elif repeats:
                body = torch.cat([body, body[torch.tensor(repeats, device=h.device)]])
            sources = list(range(n_rows)) + [j for j in repeats if j < n_rows]
            positions = list(range(n_rows)) + [n + i for i, j in enumerate(repeats) if j < n_rows]
            placed.append((rows, rows[torch.tensor(sources, dtype=torch.int64, device=h.device)],
                           torch.tensor(positions, dtype=torch.int64, device=h.device)))
            parts += [self.cls_token.to(h.dtype), body]
            edges.append(edges[-1] + 1 + body.shape[0])
        return torch.cat(parts), edges, placed

    def aggregate(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None, *,
        offsets_cpu: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
        token_valid: torch.Tensor | None = None, sparse_grad: bool = False,
    ) -> MILOutput:
        """The transformer over each bag's unmasked rows of ``h [N, E]`` followed by its extra ``tokens [B, k, E]``
        (``token_valid [B]``); ``sparse_grad`` is ignored."""
        host = host_offsets(offsets, offsets_cpu)
        check_offsets(host, h.shape[0])
        bounds = host.tolist()
        x, edges, placed = self._sequences(h, bounds, mask, tokens, token_valid)
        x = self.layer1(x, edges)
        x = self.ppeg(x, edges)
        x, qkv = self.layer2(x, edges, return_qkv=True)
        x = self.norm(x)
        bag_embedding = x[torch.tensor(edges[:-1], device=h.device)]
        # the class token's attention over each grid, repeats added to the row they repeat; the rows' final features
        weights = [self.layer2.attn.class_attention(qkv, lo, hi)[positions]
                   for (lo, hi), (_, _, positions) in zip(zip(edges[:-1], edges[1:]), placed)]
        grid_rows = torch.cat([grid for _, grid, _ in placed])
        attention = torch.zeros(h.shape[0], dtype=weights[0].dtype, device=h.device).index_add(
            0, grid_rows, torch.cat(weights))
        rows = torch.cat([r for r, _, _ in placed])
        firsts = torch.cat([x[lo + 1 : lo + 1 + r.numel()] for lo, (r, _, _) in zip(edges[:-1], placed)])
        features = x.new_zeros(h.shape[0], x.shape[1]).index_copy(0, rows, firsts)
        return MILOutput(self.classifier(bag_embedding), attention, bag_embedding, features)

    def instance_logits(self, out: MILOutput) -> torch.Tensor:
        """``[N, C]``: the classifier applied to each instance's final features weighted by its attention,
        ``W (a_i x_i) + b`` (MHIM's class-aware instance probability is their max softmax)."""
        return weighted_instance_logits(self.classifier, out.instance_embedding, out.attention)
