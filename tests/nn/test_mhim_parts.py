"""The parts MHIM-MIL adds to a backbone: the global recycle network (implicit keys/values) and pooling over a bag's
kept instances plus extra tokens without concatenating the bag."""
import math

import pytest
import torch

from fastmil.nn import ABMIL, GlobalRecycleNetwork, MeanPoolMIL, recycle_reference
from tests.nn.gradient_terms import close_grads, gradient_terms
from tests.ragged import offsets_of
from tests.tolerance import check_close, rounding_bound

FAMILY = "nn.mhim_parts"


def _recycle_depth(dim: int, heads: int, n: int) -> int:
    """Roundings into one recycled token for a bag of n rows: the query's LayerNorm over E (mean and variance, +
    4) and projection over E (+ bias); the logits (the key projection over E, the query product over the head width
    d, + scale; implicit: the folded directions over d, then over E, + gamma); the rows' LayerNorm (2 E + 4); the
    softmax over n (+ 3); the pooled sum over n; gamma and beta (+ 2); the value projection over E (+ bias); the
    output projection over E (+ bias)."""
    d = dim // heads
    return (2 * dim + 4) + dim + 1 + dim + d + 2 + (2 * dim + 4) + n + 3 + n + 2 + dim + 1 + dim + 1


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
    # fp64 against fp64, two computed sides: twice the bound of the largest bag's chain
    depth = _recycle_depth(dim, heads, max(sizes))
    check_close(got, want, 2 * rounding_bound(depth, torch.float64), FAMILY, f"recycle fp64 E={dim}")
    assert torch.all(got[1] == 0)
    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    params = [p for _, p in net.named_parameters()]
    got_grads = torch.autograd.grad((got * upstream).sum(), [h, *params], allow_unused=True)
    want_grads = torch.autograd.grad((want * upstream).sum(), [h, *params], allow_unused=True)
    names = ["h", *(n for n, _ in net.named_parameters())]
    # k_proj.bias: softmax ignores it (its exact gradient is 0; the implicit network returns none, the explicit one
    # rounding): compared, like every projection's gradient, relative to the magnitude of its terms
    terms = gradient_terms(net, lambda: (recycle_reference(net, h, offsets, mask) * upstream).sum())
    got_grads = {n: torch.zeros_like(b) if a is None else a for n, a, b in zip(names, got_grads, want_grads)}
    # the forward chain, the backward through the same reductions (as long again), the sum over all rows
    bound = 2 * rounding_bound(2 * depth + sum(sizes), torch.float64)
    close_grads(got_grads, dict(zip(names, want_grads)), bound, FAMILY, f"recycle fp64 E={dim} grad", terms)


def test_recycle_network_in_fp32():
    """The same network in fp32 agrees with the fp64 explicit computation to fp32 accuracy (measured 2e-7 of the
    tokens' scale, against a bound of 5.4e-6; rounding the pooled rows to bf16 gives ~1e-3 and fails)."""
    net64 = _net(32, 5, 8, seed=3)
    sizes = [40, 7, 120]
    offsets = offsets_of(sizes)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(sum(sizes), 32, generator=g)
    mask = torch.rand(sum(sizes), generator=g) > 0.3
    with torch.no_grad():
        want = recycle_reference(net64, h.double(), offsets, mask)
        got, _ = _net(32, 5, 8, seed=3).float()(h, offsets, mask)
    # one fp32 side against the fp64 reference (its own error negligible): the chain of the largest bag
    check_close(got, want, rounding_bound(_recycle_depth(32, 8, max(sizes))), FAMILY, "recycle fp32 vs fp64")


def test_query_ema_follows_each_valid_bag_in_order():
    net = _net(8, 2, 2).float()
    net.query_momentum = 0.5  # the default 0.9999 would leave the tokens' share (and their order) below fp32 rounding
    start = net.queries.clone()
    tokens = torch.randn(3, 2, 8)
    valid = torch.tensor([True, False, True])
    net.update_queries(tokens, valid)
    m = net.query_momentum
    expected = start
    for b in (0, 2):
        expected = m * expected + (1 - m) * tokens[b]
    # fp32 both sides (twice the bound): two updates of (multiply, multiply, add) one after the other against m^2 q
    # + the sum of the decayed tokens (the decays m^j rounded from fp64 to fp32, the products, the 2-term sum): ~8
    check_close(net.queries, expected, 2 * rounding_bound(8), FAMILY, "query EMA")
    assert "queries" in dict(net.named_buffers()) and "queries" not in dict(net.named_parameters())


def test_query_ema_leaves_the_queries_alone_without_a_valid_bag_or_an_applied_step():
    """No valid bag, or ``applied`` False (a skipped fp16 step): the queries stay bit for bit, even where an
    invalid bag's tokens are not finite (the update is device arithmetic over all bags, not an indexed subset)."""
    net = _net(8, 2, 2).float()
    start = net.queries.clone()
    tokens = torch.randn(2, 2, 8)
    tokens[1] = float("nan")
    net.update_queries(tokens, torch.tensor([False, False]))
    assert torch.equal(net.queries, start)
    net.update_queries(tokens[:1], torch.tensor([True]), applied=torch.tensor(False))
    assert torch.equal(net.queries, start)
    net.update_queries(tokens, torch.tensor([True, False]), applied=torch.tensor(True))
    assert not torch.equal(net.queries, start) and bool(torch.isfinite(net.queries).all())


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
    # fp64, two computed sides (twice the bound): the embedding over 6 (+ 2); the scores (ABMIL: V/U over 8, + 4,
    # w over 5, + bias); the merge of the two softmax groups (~8 steps); the softmax over <= 7 rows and tokens
    # (+ 3); the pooled sum over them; the classifier over 8 (+ bias)
    depth = 6 + 2 + (8 + 4 + 5 + 1) + 8 + 7 + 3 + 7 + 8 + 1
    check_close(out.logits, ref, 2 * rounding_bound(depth, torch.float64), FAMILY, f"{model_cls.__name__} tokens")
    assert torch.all(out.attention[~mask] == 0)
    params = [tokens, *model.parameters()]
    g1 = torch.autograd.grad(ours().logits.sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(concatenated().sum(), params, allow_unused=True)
    names = ["tokens", *(n for n, _ in model.named_parameters())]
    assert [n for n, a, b in zip(names, g1, g2) if (a is None) != (b is None)] == []
    # relative to each projection's terms (the score layer's bias has an exact gradient of 0); the backward as long
    # as the forward, + the sum over the 13 rows and 8 tokens
    terms = gradient_terms(model, lambda: concatenated().sum())
    close_grads({n: a for n, a in zip(names, g1) if a is not None}, {n: b for n, b in zip(names, g2) if b is not None},
                2 * rounding_bound(2 * depth + 13 + 8, torch.float64), FAMILY, f"{model_cls.__name__} tokens grad",
                terms)
    assert math.isfinite(float(out.logits.detach().sum()))
