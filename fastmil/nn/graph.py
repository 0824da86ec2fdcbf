"""Spatial graph layers over the patch lattice: graph attention, the supernode readout, and the SRMIL backbone.

``GraphMIL`` (``model: graphmil``) is the network of SRMIL (Wu et al., WACV 2026; DESIGN.md section 4):
``Linear(D -> D)`` ("reformer", folded into the first layer's weights: both are linear) -> two
:class:`GraphAttentionLayer` (4 heads x 64 = 256, LeakyReLU 0.2 scores,
self loops, LayerNorm + PReLU) over each slide's stencil graph (:func:`fastmil.ops.grid_neighbours`, radius 2 =
a 5 x 5 window) -> :class:`SupernodeReadout` (a learned query per head attends over every instance of the bag,
heads averaged) -> ``MLP(64 -> 128 -> C)``. The training-only parts of SRMIL (mask token, decoder) belong to
the method (:class:`fastmil.methods.SRMIL`), so a trained ``GraphMIL`` predicts on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..bags import Bags
from ..ops import attention_pool, graph_attention, grid_neighbours
from ..ops.layer_norm_prelu import layer_norm_prelu
from ..ops.reconstruction_loss import projected_reconstruction_loss, reconstruction_loss
from .abmil import check_sizes
from .attention import pool_with_tokens
from .output import MILOutput
from .registry import register_model

__all__ = ["GraphAttentionLayer", "GraphDecoder", "GraphMIL", "LayerParts", "SupernodeReadout", "bag_neighbours"]


def bag_neighbours(bags: Bags, radius: int) -> torch.Tensor:
    """The batch's stencil table ``int64 [N, K]``: ``bags.neighbours`` when the loader attached one of this
    radius, else built now from ``bags.coords`` (each bag's stride inferred). Bags without coords are an error
    naming them."""
    k = (2 * radius + 1) ** 2 - 1
    if bags.neighbours is not None:
        if bags.neighbours.shape[1] != k:
            raise ValueError(f"the batch carries a neighbour table of K = {bags.neighbours.shape[1]}, the model "
                             f"needs radius {radius} (K = {k})")
        return bags.neighbours
    if bags.coords is None:
        raise ValueError(f"slides {bags.ids[:5]} have no patch coordinates; spatial models (graphmil, srmil) need "
                         "them")
    return grid_neighbours(bags.coords, bags.offsets, radius, ids=bags.ids, offsets_cpu=bags.offsets_cpu)


def _dropout_in_place(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout on the encoder's output in place, keeping a bool mask (1 byte per element) for backward where
    ``nn.Dropout`` keeps a float one; the output is not needed for the backward of the layer that made it
    (:func:`fastmil.ops.layer_norm_prelu` keeps its input)."""
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
    return x.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p))


class LayerParts(NamedTuple):
    """The row-wise linear part of a :class:`GraphAttentionLayer`: projected features ``z [N, H*C]``, attention
    scores ``[N, 2H]`` (source, then destination) and the residual branch ``[N, H*C]`` (None without one)."""

    z: torch.Tensor
    scores: torch.Tensor
    residual: torch.Tensor | None

    def where(self, rows: torch.Tensor, token: LayerParts) -> LayerParts:
        """These parts with the rows where ``rows`` is True replaced by ``token``'s single row."""
        pick = lambda a, b: None if a is None else torch.where(rows[:, None], b, a)  # noqa: E731
        return LayerParts(pick(self.z, token.z), pick(self.scores, token.scores), pick(self.residual, token.residual))


class GraphAttentionLayer(nn.Module):
    """One multi-head graph-attention layer: ``[N, in_dim] -> [N, heads * head_dim]``.

    ``z = W x`` split into heads; per head ``score_src = <z_j, a_src>``, ``score_dst = <z_i, a_dst>`` (folded into
    ``x``: ``(W^T a) . x``, no pass over ``z``); :func:`fastmil.ops.graph_attention` over the stencil table (plus
    self loops); ``+ bias``; ``+ residual`` (identity where widths match, a linear projection where they differ);
    then LayerNorm and PReLU (both optional: the decoder's last layer outputs raw features).
    """

    def __init__(self, in_dim: int, heads: int, head_dim: int, *, negative_slope: float = 0.2,
                 self_loop: bool = True, residual: bool = True, norm: bool = True, activation: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        check_sizes(in_dim=in_dim, heads=heads, head_dim=head_dim)
        out_dim = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.negative_slope, self.self_loop, self.backend = negative_slope, self_loop, backend
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        bound = math.sqrt(6.0 / (1 + head_dim))  # Glorot over (head_dim, 1), as GAT initialises its vectors
        self.att_src = nn.Parameter(torch.empty(heads, head_dim).uniform_(-bound, bound))
        self.att_dst = nn.Parameter(torch.empty(heads, head_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.residual = (nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)) \
            if residual else None
        self.norm = nn.LayerNorm(out_dim) if norm else nn.Identity()
        self.act = nn.PReLU() if activation else nn.Identity()

    @property
    def out_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def aggregates_first(self) -> bool:
        """One head wider than its input (the decoder's last layer, back to the feature width) aggregates first
        and projects after: ``sum_j alpha_ij W x_j = W sum_j alpha_ij x_j``, exact, with the neighbour sums over
        ``in_dim`` channels instead of ``head_dim``."""
        return self.heads == 1 and self.proj.in_features < self.head_dim

    def _score_weight(self) -> torch.Tensor:
        """``[2H, in]``: the attention vectors folded into the projection, ``score = (W^T a) . x``."""
        w = self.proj.weight.view(self.heads, self.head_dim, -1)  # [H, C, in]
        return torch.cat([torch.einsum("hc,hci->hi", self.att_src, w), torch.einsum("hc,hci->hi", self.att_dst, w)])

    def linear_parts(self, x: torch.Tensor, pre: nn.Linear | None = None) -> LayerParts:
        """The row-wise linear maps of the layer on ``x [N, in]`` (or on ``pre(x)`` without forming it: ``pre`` is
        folded into the weights, one GEMM of ``x`` against ``[proj; scores; residual] @ pre.weight``).

        Because they act row by row, a view of the bag that replaces some rows by a token has the parts of the
        clean view with those rows replaced by the token's parts (SRMIL's masked view)."""
        if self.aggregates_first:
            raise ValueError("linear_parts: this layer aggregates its input before projecting")
        head = torch.cat([self.proj.weight, self._score_weight()])  # [out + 2H, in]
        z_scores = self._project(x, head, pre)
        z, scores = z_scores.split([self.out_dim, 2 * self.heads], dim=1)
        if isinstance(self.residual, nn.Linear):
            # a GEMM of its own: the residual is consumed by one add, so its memory is freed right after (as one
            # block with z it would live as long as z, which graph attention keeps for backward)
            residual = self._project(x, self.residual.weight, pre)
        elif isinstance(self.residual, nn.Identity):
            residual = x if pre is None else pre(x)
        else:
            residual = None
        return LayerParts(z, scores, residual)

    @staticmethod
    def _project(x: torch.Tensor, weight: torch.Tensor, pre: nn.Linear | None) -> torch.Tensor:
        """``x @ weight.T``, or ``pre(x) @ weight.T`` as one GEMM against ``weight @ pre.weight``."""
        if pre is None:
            return x @ weight.T.to(x.dtype)
        folded = (weight @ pre.weight).T.to(x.dtype)
        return x @ folded if pre.bias is None else torch.addmm((weight @ pre.bias).to(x.dtype), x, folded)

    def mix(self, parts: LayerParts, nbr: torch.Tensor) -> torch.Tensor:
        """Graph attention over the stencil table, bias, residual, LayerNorm, PReLU: ``[N, heads * head_dim]``."""
        n = parts.z.shape[0]
        z = parts.z.reshape(n, self.heads, self.head_dim)
        out = graph_attention(z, nbr, parts.scores[:, : self.heads], parts.scores[:, self.heads:],
                              self.negative_slope, self.self_loop, backend=self.backend).reshape(n, self.out_dim)
        return self._finish(out, parts.residual)

    def _finish(self, out: torch.Tensor, residual: torch.Tensor | None, *, has_bias: bool = False) -> torch.Tensor:
        """``+ residual + bias`` (one new tensor: the bias is added in place), then LayerNorm + PReLU fused
        (:func:`fastmil.ops.layer_norm_prelu`: only the input is kept for backward)."""
        if residual is not None:
            out = out + residual
            if not has_bias:
                out.add_(self.bias.to(out.dtype))
        elif not has_bias:
            out = out + self.bias.to(out.dtype)
        if isinstance(self.norm, nn.LayerNorm) and isinstance(self.act, nn.PReLU):
            return layer_norm_prelu(out, self.norm.weight, self.norm.bias, self.act.weight, self.norm.eps)
        return self.act(self.norm(out))

    def aggregate(self, x: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        """The one-head neighbour mix of the input, before the projection (layers that aggregate first):
        ``[N, in_dim]``."""
        scores = x @ self._score_weight().T.to(x.dtype)  # [N, 2]
        return graph_attention(x[:, None, :], nbr, scores[:, :1], scores[:, 1:], self.negative_slope,
                               self.self_loop, backend=self.backend)[:, 0]

    def forward(self, x: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        """``x [N, in_dim]``, ``nbr int64 [N, K]`` -> ``[N, heads * head_dim]`` in ``x``'s dtype."""
        if not self.aggregates_first:
            return self.mix(self.linear_parts(x), nbr)
        mixed = self.aggregate(x, nbr)
        out = F.linear(mixed, self.proj.weight, self.bias.to(mixed.dtype))
        return self._finish(out, None if self.residual is None else self.residual(x), has_bias=True)


class SupernodeReadout(nn.Module):
    """A learned "supernode" query per head attends over every instance of a bag.

    ``score_ih = <x_ih, q_h> / sqrt(C)`` for ``x [N, H*C]`` seen as ``[N, H, C]``; ``forward`` is
    :func:`fastmil.ops.attention_pool` with those ``[N, H]`` scores: ``(pooled [B, H, H*C], weights [N, H])`` fp32
    (plus the log-sum-exp ``[B, H]`` with ``return_lse``), the interface :func:`pool_with_tokens` merges extra
    tokens into per head. :meth:`own_heads` keeps each head's pooling of its own C channels and averages the heads:
    ``[B, C]``.
    """

    def __init__(self, heads: int, head_dim: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        self.query = nn.Parameter(torch.randn(heads, head_dim) / math.sqrt(head_dim))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` unnormalised attention of instances (or tokens) ``x [..., H*C]``, per head."""
        z = x.unflatten(-1, (self.heads, self.head_dim))
        return torch.einsum("...hc,hc->...h", z, self.query.to(z.dtype)) / math.sqrt(self.head_dim)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
                offsets_cpu: torch.Tensor | None = None, return_lse: bool = False,
                sparse_grad: bool = False) -> tuple[torch.Tensor, ...]:
        """``sparse_grad`` is accepted as every pool module takes it; the gradient of ``x`` is dense."""
        return attention_pool(self.scores(x), x, offsets, mask, backend=self.backend, offsets_cpu=offsets_cpu,
                              return_lse=return_lse)

    def own_heads(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, H, H*C]`` -> ``[B, C]``: head h's attention over head h's channels, averaged over heads."""
        per_head = pooled.unflatten(-1, (self.heads, self.head_dim))  # [B, H (attention), H (channels), C]
        return per_head.diagonal(dim1=1, dim2=2).mean(-1)


class GraphDecoder(nn.Module):
    """SRMIL's decoder: encoder outputs of a masked view ``[N, E]`` -> reconstructed input features ``[N, D]``.

    ``Linear(E -> E)``; the masked rows are replaced by a learned decoder token (so the decoder must rebuild them
    from their neighbours); graph-attention layers (the last one a single head back to ``D``, without norm,
    activation or residual: it outputs raw features).
    """

    def __init__(self, width: int, out_dim: int, heads: int, head_dim: int, *, layers: int = 2,
                 negative_slope: float = 0.2, backend: str = "auto") -> None:
        super().__init__()
        check_sizes(width=width, out_dim=out_dim, layers=layers)
        self.proj = nn.Linear(width, width)
        self.token = nn.Parameter(torch.zeros(width))
        hidden = [GraphAttentionLayer(width, heads, head_dim, negative_slope=negative_slope, backend=backend)
                  for _ in range(layers - 1)]
        last_in = heads * head_dim if layers > 1 else width
        self.layers = nn.ModuleList([*hidden, GraphAttentionLayer(
            last_in, 1, out_dim, negative_slope=negative_slope, residual=False, norm=False, activation=False,
            backend=backend)])

    def _hidden(self, h: torch.Tensor, nbr: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        x = torch.where(masked[:, None], self.token.to(h.dtype), self.proj(h))
        for layer in self.layers[:-1]:
            x = layer(x, nbr)
        return x

    def forward(self, h: torch.Tensor, nbr: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """``h [N, E]``, ``nbr [N, K]``, ``masked bool [N]`` -> ``[N, D]`` in ``h``'s dtype."""
        return self.layers[-1](self._hidden(h, nbr, masked), nbr)

    def reconstruction_loss(self, h: torch.Tensor, nbr: torch.Tensor, masked: torch.Tensor, target: torch.Tensor,
                            alpha: float = 1.0) -> torch.Tensor:
        """``reconstruction_loss(self(h, nbr, masked), target, masked, alpha)``. When the last layer aggregates
        before projecting, the projection back to ``D`` is fused into the loss
        (:func:`fastmil.ops.projected_reconstruction_loss`): the ``[N, D]`` reconstruction is never formed."""
        x, last = self._hidden(h, nbr, masked), self.layers[-1]
        if last.aggregates_first and last.residual is None:
            mixed = last.aggregate(x, nbr)
            return projected_reconstruction_loss(mixed, last.proj.weight, last.bias, target, masked, alpha)
        return reconstruction_loss(last(x, nbr), target, masked, alpha)


@register_model("graphmil")
class GraphMIL(nn.Module):
    """SRMIL's network: reformer ``Linear(D -> D)``, graph-attention encoder, supernode readout, MLP head.

    ``forward(bags)`` -> ``(logits [B, C], attention [N])`` (the supernode's attention averaged over heads);
    ``forward_all(bags)`` -> :class:`MILOutput` with the encoder outputs ``[N, heads * head_dim]`` as instance
    embeddings and the readout ``[B, head_dim]`` as bag embedding. Needs ``bags.coords`` or ``bags.neighbours``
    (the loader attaches cached tables of :attr:`neighbour_radius`).
    """

    @dataclass
    class Config:
        """The ``model:`` config section of the SRMIL network (defaults of DESIGN.md section 4)."""

        name: str = "graphmil"
        heads: int = 4
        head_dim: int = 64
        layers: int = 2
        radius: int = 2  # stencil radius: a (2r+1) x (2r+1) window
        head_hidden: int = 128
        negative_slope: float = 0.2
        dropout: float = 0.25

        def __post_init__(self) -> None:
            check_sizes(heads=self.heads, head_dim=self.head_dim, layers=self.layers, radius=self.radius,
                        head_hidden=self.head_hidden, dropout=self.dropout)

    def __init__(self, in_dim: int, n_classes: int = 2, *, heads: int = 4, head_dim: int = 64, layers: int = 2,
                 radius: int = 2, head_hidden: int = 128, negative_slope: float = 0.2, dropout: float = 0.25,
                 backend: str = "auto") -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.neighbour_radius = radius
        self.reformer = nn.Linear(in_dim, in_dim)
        dims = [in_dim] + [heads * head_dim] * layers
        self.encoder = nn.ModuleList(
            GraphAttentionLayer(dims[i], heads, head_dim, negative_slope=negative_slope, backend=backend)
            for i in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.readout = SupernodeReadout(heads, head_dim, backend=backend)
        self.head = nn.Sequential(nn.Linear(head_dim, head_hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(head_hidden, n_classes))

    @classmethod
    def from_config(cls, config: Config, in_dim: int, n_classes: int) -> GraphMIL:
        return cls(in_dim, n_classes, heads=config.heads, head_dim=config.head_dim, layers=config.layers,
                   radius=config.radius, head_hidden=config.head_hidden, negative_slope=config.negative_slope,
                   dropout=config.dropout)

    @property
    def embedding_dim(self) -> int:
        """Width of the instance embeddings (encoder outputs, ``heads * head_dim``): what extra tokens pooled
        beside them (MHIM's recycled summaries) must have. The bag embedding is the readout, ``head_dim`` wide."""
        return self.readout.heads * self.readout.head_dim

    @property
    def in_dim(self) -> int:
        return self.reformer.in_features

    def input_parts(self, features: torch.Tensor) -> LayerParts:
        """The first encoder layer's linear parts of ``features [N, D]``, the reformer folded into its weights
        (``W (R x + b) = (W R) x + W b``: no ``N x D`` reformed copy and no ``N x D x D`` GEMM)."""
        x = features.to(self.reformer.weight.dtype)
        return self.encoder[0].linear_parts(x, pre=self.reformer)

    def encode_parts(self, parts: LayerParts, nbr: torch.Tensor) -> torch.Tensor:
        """Encoder outputs ``[N, heads * head_dim]`` from the first layer's linear parts."""
        x = self.encoder[0].mix(parts, nbr)
        for layer in self.encoder[1:]:
            x = layer(x, nbr)
        return _dropout_in_place(x, self.dropout.p) if self.training and self.dropout.p > 0 else x

    def encode(self, features: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` features -> encoder outputs ``[N, heads * head_dim]`` in the parameters' dtype."""
        return self.encode_parts(self.input_parts(features), nbr)

    def classify(self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None, *,
                 offsets_cpu: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                 token_valid: torch.Tensor | None = None, sparse_grad: bool = False) -> MILOutput:
        """Supernode readout over the encoded instances ``h`` (those with ``mask`` True, plus optional extra
        ``tokens [B, k, heads * head_dim]``), then the MLP head (``sparse_grad``: see :func:`pool_with_tokens`)."""
        pooled, weights = pool_with_tokens(self.readout, h, offsets, mask, tokens, token_valid, offsets_cpu,
                                           sparse_grad)
        pooled = self.readout.own_heads(pooled).to(h.dtype)
        return MILOutput(self.head(pooled), weights.mean(-1), pooled, h)

    # the backbone interface MHIM-MIL drives (fastmil.methods.mhim.BACKBONE_METHODS)
    def embed_bags(self, bags: Bags) -> torch.Tensor:
        """Encoder outputs ``[N, heads * head_dim]`` of a batch (its stencil graph from :func:`bag_neighbours`)."""
        return self.encode(bags.features, bag_neighbours(bags, self.neighbour_radius))

    def aggregate(self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None, *,
                  offsets_cpu: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                  token_valid: torch.Tensor | None = None, sparse_grad: bool = False) -> MILOutput:
        return self.classify(h, offsets, mask, offsets_cpu=offsets_cpu, tokens=tokens, token_valid=token_valid,
                             sparse_grad=sparse_grad)

    def activate_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Recycled tokens enter where encoder outputs sit: after the encoder's PReLU, through its dropout."""
        return self.dropout(self.encoder[-1].act(tokens))

    def instance_logits(self, out: MILOutput) -> torch.Tensor:
        """``[N, C]`` class logits of each instance: the head applied to the instance's own readout vector
        (its heads' channels averaged), scaled by its attention as the readout weighs it."""
        h = out.instance_embedding
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        per_instance = h.unflatten(-1, (self.readout.heads, self.readout.head_dim)).to(acc).mean(1)  # [N, C]
        weighted = per_instance * out.attention.to(acc)[:, None]
        return self.head(weighted.to(self.head[0].weight.dtype)).to(acc)

    def forward_all(self, bags: Bags, mask: torch.Tensor | None = None) -> MILOutput:
        if not isinstance(bags, Bags):
            raise TypeError("GraphMIL takes a Bags batch (it needs the slides' coordinates or neighbour tables)")
        return self.classify(self.embed_bags(bags), bags.offsets, mask, offsets_cpu=bags.offsets_cpu)

    def forward(self, bags: Bags, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_all(bags, mask)
        return out.logits, out.attention
