"""The parts MHIM-MIL adds to a backbone: the global recycle network (implicit keys/values) and pooling over a bag's
kept instances plus extra tokens without concatenating the bag."""
import math

import pytest
import torch

from fastmil.nn import ABMIL, GlobalRecycleNetwork, MeanPoolMIL, recycle_reference
from tests.ragged import offsets_of


def _net(dim, tokens, heads, seed=0):
    torch.manual_seed(seed)
    net = GlobalRecycleNetwork(dim, n_tokens=tokens, n_heads=heads).double()
    with torch.no_grad():
        for p in net.parameters():  # LayerNorm affine parameters away from (1, 0), so they matter
            p.add_(0.2 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("dim,tokens,heads", [(16, 3, 4), (32, 5, 8)])  # 5 x 8 = 40 (query, head) columns
def test_implicit_recycle_network_equals_explicit_cross_attention_fp64(dim, tokens, heads):
    net = _net(dim, tokens, heads)
    sizes = [5, 1, 9, 4, 30]
    offsets = offsets_of(sizes)
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    mask = torch.rand(sum(sizes), generator=g) > 0.4
    mask[5] = False  # the bag of one recycles nothing
    got, valid = net(h, offsets, mask)
    want = recycle_reference(net, h, offsets, mask)
    assert valid.tolist() == [True, False, True, True, True]
    assert float((got - want).detach().abs().max()) <= 1e-12 * float(want.detach().abs().max())
    assert torch.all(got[1] == 0)
    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    params = [p for _, p in net.named_parameters()]
    got_grads = torch.autograd.grad((got * upstream).sum(), [h, *params], allow_unused=True)
    want_grads = torch.autograd.grad((want * upstream).sum(), [h, *params], allow_unused=True)
    names = ["h", *(n for n, _ in net.named_parameters())]
    for name, a, b in zip(names, got_grads, want_grads):
        a = torch.zeros_like(b) if a is None else a  # k_proj.bias: softmax ignores it (its exact gradient is 0)
        scale = max(float(b.abs().max()), 1e-300)
        assert float((a - b).abs().max()) <= 1e-10 * max(scale, 1.0), name


def test_recycle_network_in_fp32():
    """The same network in fp32 agrees with the fp64 explicit computation to fp32 accuracy (measured 2e-7 of the
    tokens' scale; rounding the pooled rows to bf16 gives ~1e-3 and fails)."""
    net64 = _net(32, 5, 8, seed=3)
    sizes = [40, 7, 120]
    offsets = offsets_of(sizes)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(sum(sizes), 32, generator=g)
    mask = torch.rand(sum(sizes), generator=g) > 0.3
    with torch.no_grad():
        want = recycle_reference(net64, h.double(), offsets, mask)
        got, _ = _net(32, 5, 8, seed=3).float()(h, offsets, mask)
    assert float((got.double() - want).abs().max()) <= 2e-6 * float(want.abs().max())


def test_query_ema_follows_each_valid_bag_in_order():
    net = _net(8, 2, 2).float()
    start = net.queries.clone()
    tokens = torch.randn(3, 2, 8)
    valid = torch.tensor([True, False, True])
    net.update_queries(tokens, valid)
    m = net.query_momentum
    expected = start
    for b in (0, 2):
        expected = m * expected + (1 - m) * tokens[b]
    torch.testing.assert_close(net.queries, expected, atol=1e-7, rtol=1e-6)
    assert "queries" in dict(net.named_buffers()) and "queries" not in dict(net.named_parameters())


@pytest.mark.parametrize("model_cls", [ABMIL, MeanPoolMIL])
def test_pooling_with_tokens_equals_pooling_the_concatenated_bag(model_cls):
    """``aggregate(h, mask, tokens)`` == attention pooling over [kept instances; the bag's tokens], forward and
    gradients (fp64), including a bag whose instances are all masked and a bag whose tokens are invalid."""
    torch.manual_seed(4)
    kwargs = {"attn_dim": 5} if model_cls is ABMIL else {}
    model = model_cls(6, embed_dim=8, dropout=0.0, **kwargs).double()
    sizes = [4, 3, 5, 1]
    offsets = offsets_of(sizes)
    x = torch.randn(sum(sizes), 6, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)  # bag 1: all masked
    tokens = torch.randn(4, 2, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, True, False, True])

    def ours():
        return model.aggregate(model.embed_instances(x), offsets, mask, tokens=tokens, token_valid=valid)

    def concatenated():
        h = model.embed_instances(x)
        pooled = []
        for b, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            rows = h[lo:hi][mask[lo:hi]]
            if valid[b]:
                rows = torch.cat([rows, tokens[b]])
            a = torch.softmax(model.pool.scores(rows), 0)
            pooled.append(a @ rows)
        return model.classifier(torch.stack(pooled))

    out = ours()
    ref = concatenated()
    torch.testing.assert_close(out.logits, ref, atol=1e-12, rtol=1e-12)
    assert torch.all(out.attention[~mask] == 0)
    params = [tokens, *model.parameters()]
    g1 = torch.autograd.grad(ours().logits.sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(concatenated().sum(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert math.isfinite(float(out.logits.detach().sum()))
