"""The graph-attention layer's algebraic shortcuts equal the plain computation: the reformer folded into the first
layer, the masked view from the clean view's parts, aggregate-then-project for one wide head; the readout with
tokens merges per head exactly."""
from __future__ import annotations

import torch
from torch import nn

from fastmil.nn import GraphAttentionLayer, SupernodeReadout, pool_with_tokens
from fastmil.ops import graph_attention_reference, grid_neighbours
from tests.tolerance import check_close, rounding_bound

FAMILY = "nn.graph"
K = 9  # radius-1 stencil: 8 neighbours and the self loop


def _layer_depth(in_dim: int, head_dim: int, out_dim: int, pre: int = 0, norm: bool = True) -> int:
    """Roundings into one output of a graph-attention layer (fp64): the projection over in_dim (after ``pre``'s
    GEMM over its input, when folded in), the scores (the attention vector folded over head_dim, then over in_dim,
    + LeakyReLU), the softmax over the K neighbours (+ 3), the weighted sum over K (the aggregate-first layer then
    projects over in_dim), + bias, + residual (its own projection over in_dim), the LayerNorm over out_dim (mean and
    variance, + 4) and PReLU."""
    return pre + in_dim + head_dim + in_dim + 1 + K + 3 + K + in_dim + 2 + in_dim + (2 * out_dim + 5 if norm else 0)


def _close(actual, expected, depth: int, what: str) -> None:
    """fp64 against fp64, both computed with their own orders: twice the chain's bound."""
    check_close(actual, expected, 2 * rounding_bound(depth, torch.float64), FAMILY, what)


def _graph(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(64, generator=g)[:n]
    coords = torch.stack([cells % 8 * 100, cells // 8 * 100], 1)
    return grid_neighbours(coords, torch.tensor([0, n]), 1, step=100), g


def _plain(layer: GraphAttentionLayer, x: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """The layer written out: project, score, aggregate (dense reference), bias, residual, norm, activation."""
    n = x.shape[0]
    z = layer.proj(x).view(n, layer.heads, layer.head_dim)
    src = (z * layer.att_src).sum(-1)
    dst = (z * layer.att_dst).sum(-1)
    out = graph_attention_reference(z, nbr, src, dst, layer.negative_slope, layer.self_loop).reshape(n, -1)
    out = out + layer.bias
    if layer.residual is not None:
        out = out + layer.residual(x)
    return layer.act(layer.norm(out))


def test_layer_equals_the_written_out_computation():
    nbr, g = _graph()
    torch.manual_seed(0)
    for in_dim, heads, head_dim, kw in [(12, 2, 6, {}), (12, 3, 5, {}), (6, 1, 20, {}),
                                        (6, 1, 20, dict(residual=False, norm=False, activation=False))]:
        layer = GraphAttentionLayer(in_dim, heads, head_dim, **kw).double()
        x = torch.randn(nbr.shape[0], in_dim, generator=g, dtype=torch.float64)
        assert layer.aggregates_first == (heads == 1 and in_dim < head_dim)
        _close(layer(x, nbr), _plain(layer, x, nbr), _layer_depth(in_dim, head_dim, heads * head_dim, norm=not kw),
               f"layer {in_dim}->{heads}x{head_dim}{' plain' if kw else ''}")


def test_reformer_folded_and_masked_view_from_clean_parts():
    nbr, g = _graph(seed=1)
    torch.manual_seed(1)
    pre, layer = nn.Linear(10, 10).double(), GraphAttentionLayer(10, 2, 4).double()
    x = torch.randn(nbr.shape[0], 10, generator=g, dtype=torch.float64)
    token = torch.randn(10, generator=g, dtype=torch.float64)
    masked = torch.rand(nbr.shape[0], generator=g) < 0.6
    clean = layer.linear_parts(x, pre=pre)
    depth = _layer_depth(10, 4, 8, pre=10)  # the reformer's GEMM over 10 (folded: W @ pre.weight over 10) first
    _close(layer.mix(clean, nbr), _plain(layer, pre(x), nbr), depth, "reformer folded")
    view = torch.where(masked[:, None], token, x)
    from_parts = layer.mix(clean.where(masked, layer.linear_parts(token[None], pre=pre)), nbr)
    _close(from_parts, _plain(layer, pre(view), nbr), depth, "masked view from clean parts")


def test_multi_head_readout_with_tokens_equals_pooling_the_concatenation():
    g = torch.Generator().manual_seed(2)
    readout = SupernodeReadout(3, 4).double()
    sizes = [5, 1, 7]
    offsets = torch.tensor([0, 5, 6, 13])
    h = torch.randn(13, 12, generator=g, dtype=torch.float64)
    tokens = torch.randn(3, 2, 12, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, False, True])
    mask = torch.rand(13, generator=g) > 0.3
    pooled, weights = pool_with_tokens(readout, h, offsets, mask, tokens, valid)
    for b, n in enumerate(sizes):
        lo = int(offsets[b])
        rows = h[lo: lo + n][mask[lo: lo + n]]
        allx = torch.cat([rows, tokens[b]]) if valid[b] else rows
        a = torch.softmax(readout.scores(allx), 0)  # [n', H]
        # the scores over the head width 4 (+ scale), the merge of the rows' and tokens' softmax groups (~8
        # elementwise steps), the softmax over the n' <= 9 rows and tokens (+ 3); the pooled sum over them
        weights_depth = 4 + 1 + 8 + 9 + 3
        _close(pooled[b], a.T @ allx, weights_depth + 9, "readout with tokens: pooled")
        _close(weights[lo: lo + n][mask[lo: lo + n]], a[: rows.shape[0]], weights_depth, "readout with tokens: weights")
