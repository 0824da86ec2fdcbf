"""TransMIL on packed ragged bags: against an independent per-bag reference written the way the published model and
the Nystrom attention it uses compute (batch of one, padding by repeats, zero front padding, einsum landmarks),
packed == per bag (outputs and gradients), masked instances without effect, extra tokens == appended instances,
exact attention == softmax attention, and the heatmap attention."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastmil.bags import Bags
from fastmil.nn import TransMIL
from fastmil.nn.transmil import moore_penrose_pinv
from tests.nn.gradient_terms import close_grads, gradient_terms
from tests.tolerance import check_close, check_per_bag, rounding_bound

FAMILY = "nn.transmil"
D, E, HEAD, M, ITERATIONS = 10, 16, 8, 4, 6  # _model's sizes: features, embedding, head width, landmarks, pinv steps


# Depths (tests/tolerance.py) of one fp64 result's chain for a bag of n rows; every comparison here has two computed
# sides with their own rounding orders, so it allows twice the chain's bound.
def _length(n: int) -> int:
    """The bag's sequence: the class token and the squared grid of its n rows (>= 1 token)."""
    return math.ceil(math.sqrt(max(n, 1))) ** 2 + 1


def _attention_depth(n: int, exact: bool) -> int:
    """One layer ``x + to_out(attention(LayerNorm(x)))``: the LayerNorm (mean and variance over E, + 4), the qkv
    projection over E; exact: scores over the head width (+ scale), the softmax over the L tokens (+ 3), the sum
    over L; Nystrom (L padded to a multiple of M): the landmark means over a group (+ 1), the scores over the head
    width and the softmax over L (+ 3) of the third kernel and its product with v over L, the pseudo-inverse (its
    normalisation over 2M, + 1, then per iteration 5 products over M, + 4) and the two products over M; the
    residual convolution over 33 taps (+ 1), to_out over E (+ bias), the residual add."""
    length = _length(n)
    core = HEAD + 1 + length + 3 + length
    if not exact:
        padded = math.ceil(length / M) * M
        pinv = 2 * M + 1 + ITERATIONS * (5 * M + 4)
        core = padded // M + 1 + HEAD + padded + 3 + padded + pinv + 2 * M
    return 2 * E + 4 + E + core + 33 + 1 + E + 2


def _features_depth(n: int, exact: bool) -> int:
    """The final token features: the embedding over D (+ 2), layer 1, PPEG (7x7, 5x5 and 3x3 taps, + 4), layer 2,
    the final LayerNorm (2 E + 4)."""
    return D + 2 + 2 * _attention_depth(n, exact) + 49 + 25 + 9 + 4 + 2 * E + 4


def _logits_depth(n: int, exact: bool) -> int:
    return _features_depth(n, exact) + E + 1  # the classifier over E (+ bias)


def _weights_depth(n: int, exact: bool) -> int:
    """The heatmap attention: layer 2's input (all but its attention and the final LayerNorm), its LayerNorm and
    query/key projections, the class token's scores over the head width (+ scale), the softmax over the grid
    (+ 3), the mean over heads (+ 2), the sum of a row's repeats (+ 1)."""
    before = _features_depth(n, exact) - _attention_depth(n, exact) - (2 * E + 4)
    return before + 2 * E + 4 + E + HEAD + 1 + _length(n) + 3 + 2 + 1


def _grad_depth(n: int, exact: bool, total: int) -> int:
    """A gradient: the logits' chain, the cross-entropy (+ 6), the backward through the same reductions (as long
    again), the sum over the batch's ``total`` sequence rows into the parameter."""
    return 2 * (_logits_depth(n, exact) + 6) + total


def _bound(depth: int) -> float:
    return 2 * rounding_bound(depth, torch.float64)


def _close(actual, expected, depth: int, what: str) -> None:
    check_close(actual, expected, _bound(depth), FAMILY, what)


def _model(attention: str = "nystrom", landmarks: int = 4) -> TransMIL:
    torch.manual_seed(0)
    return TransMIL(10, embed_dim=16, n_classes=3, heads=2, landmarks=landmarks, pinv_iterations=6,
                    attention=attention, dropout=0.0, attn_dropout=0.0).double()


def _bags(sizes=(1, 5, 17, 30), seed=1) -> Bags:
    g = torch.Generator().manual_seed(seed)
    return Bags.from_list([torch.randn(n, 10, generator=g, dtype=torch.float64) for n in sizes],
                          labels=[i % 3 for i in range(len(sizes))])


def _reference_attention(layer, x: torch.Tensor, exact: bool) -> torch.Tensor:
    """The published layer's attention on ``x [1, n, E]``: lucidrains-style Nystrom (``F.pad`` in front, landmark
    sums over groups divided by the group size, pinv from the whole tensor's maxima) or exact softmax attention."""
    attn = layer.attn
    b, n, dim = x.shape
    heads, m = attn.heads, attn.landmarks
    if not exact and n % m:
        x = F.pad(x, (0, 0, m - n % m, 0), value=0)
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
    d = q.shape[-1]
    if exact:
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    else:
        q = q * d**-0.5
        group = math.ceil(x.shape[1] / m)
        q_l = q.reshape(b, heads, m, group, d).sum(3) / group
        k_l = k.reshape(b, heads, m, group, d).sum(3) / group
        a1 = torch.einsum("bhid,bhjd->bhij", q, k_l).softmax(-1)
        a2 = torch.einsum("bhid,bhjd->bhij", q_l, k_l).softmax(-1)
        a3 = torch.einsum("bhid,bhjd->bhij", q_l, k).softmax(-1)
        z = a2.transpose(-1, -2) / (a2.abs().sum(-1).max() * a2.abs().sum(-2).max())
        eye = torch.eye(m, dtype=x.dtype)[None, None]
        for _ in range(6):
            xz = a2 @ z
            z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
        out = (a1 @ z) @ (a3 @ v)
    out = out + attn.residual(v[0])[None]
    out = out.permute(0, 2, 1, 3).reshape(b, -1, dim)
    return attn.to_out(out)[:, -n:]


def _reference_bag(model: TransMIL, features: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, ...]:
    """One bag ``[n, D]`` -> (logits [C], class-token attention [n], final features of the n instances [n, E]) as
    the published TransMIL computes them."""
    h = F.relu(model.embed.linear(features))[None]  # [1, n, E]
    n = h.shape[1]
    side = math.ceil(math.sqrt(n))
    h = torch.cat([h, h[:, : side * side - n]], dim=1)
    h = torch.cat([model.cls_token[None], h], dim=1)
    h = h + _reference_attention(model.layer1, model.layer1.norm(h), exact)
    cls, feat = h[:, 0], h[:, 1:]
    grid = feat.transpose(1, 2).reshape(1, h.shape[2], side, side)
    convs = model.ppeg.convs
    grid = convs[0](grid) + grid + convs[1](grid) + convs[2](grid)
    h = torch.cat([cls[:, None], grid.flatten(2).transpose(1, 2)], dim=1)
    normed = model.layer2.norm(h)
    h = h + _reference_attention(model.layer2, normed, exact)
    final = model.norm(h)[0]
    logits = model.classifier(final[0])
    # heatmap: the class token's softmax attention over the grid tokens, heads averaged, repeats folded back
    attn = model.layer2.attn
    q, k, _ = attn.to_qkv(normed[0]).chunk(3, -1)
    q, k = q.reshape(-1, attn.heads, q.shape[1] // attn.heads), k.reshape(-1, attn.heads, k.shape[1] // attn.heads)
    weights = torch.stack([torch.softmax(k[1:, i] @ q[0, i] / math.sqrt(q.shape[2]), 0)
                           for i in range(attn.heads)]).mean(0)
    folded = torch.zeros(n, dtype=weights.dtype)
    for j in range(side * side):
        folded[j % n if j >= n else j] += weights[j]
    return logits, folded, final[1 : n + 1]


@pytest.mark.parametrize("attention", ["nystrom", "exact"])
def test_each_bag_equals_the_published_computation(attention):
    model = _model(attention).eval()
    bags = _bags()
    mask = torch.rand(bags.n_instances, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[0] = True
    out = model.forward_all(bags, mask=mask)
    exact = attention == "exact"
    for b in range(len(bags)):
        lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
        keep = mask[lo:hi]
        logits, weights, final = _reference_bag(model, bags.features[lo:hi][keep], exact=exact)
        n = int(keep.sum())
        _close(out.logits[b], logits, _logits_depth(n, exact), f"{attention} logits vs published")
        _close(out.attention[lo:hi][keep], weights, _weights_depth(n, exact), f"{attention} heatmap vs published")
        _close(out.instance_embedding[lo:hi][keep], final, _features_depth(n, exact), f"{attention} features")
        assert torch.all(out.instance_embedding[lo:hi][~keep] == 0)
        instance = (final @ model.classifier.weight.T) * weights[:, None] + model.classifier.bias  # MHIM's scores
        # the product of the features through the classifier (over E) and the weight: both chains (+ 2)
        _close(model.instance_logits(out)[lo:hi][keep], instance,
               _features_depth(n, exact) + E + _weights_depth(n, exact) + 2, f"{attention} instance logits")
        assert torch.all(out.attention[lo:hi][~keep] == 0)
        # the weights' sum: their chain and the sum over the grid
        check_close(out.attention[lo:hi].detach().sum(), torch.tensor(1.0, dtype=torch.float64),
                    rounding_bound(_weights_depth(n, exact) + _length(n), torch.float64), FAMILY,
                    f"{attention} heatmap sums to one")


@pytest.mark.parametrize("masked", [False, True])
def test_packed_batch_equals_each_bag_alone_outputs_and_gradients(masked):
    model = _model()
    bags = _bags()
    mask = None
    if masked:
        mask = torch.rand(bags.n_instances, generator=torch.Generator().manual_seed(4)) > 0.4
        mask[0] = True
        mask[bags.offsets[2] : bags.offsets[3]] = False  # an all-masked bag: the class token alone decides
    target = torch.tensor([0, 2, 1, 1])
    out = model.forward_all(bags, mask=mask)
    F.cross_entropy(out.logits, target, reduction="sum").backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    terms = gradient_terms(model, lambda: F.cross_entropy(model.forward_all(bags, mask=mask).logits, target,
                                                          reduction="sum"))
    model.zero_grad()
    total = 0.0
    for b in range(len(bags)):
        lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
        one = model.forward_all(bags[b], mask=None if mask is None else mask[lo:hi])
        n = hi - lo if mask is None else int(mask[lo:hi].sum())
        _close(one.logits[0], out.logits[b], _logits_depth(n, False), "per-bag logits")
        _close(one.attention, out.attention[lo:hi], _weights_depth(n, False), "per-bag heatmap")
        _close(one.bag_embedding[0], out.bag_embedding[b], _features_depth(n, False), "per-bag embedding")
        total = total + F.cross_entropy(one.logits, target[b : b + 1], reduction="sum")
    total.backward()
    n_max, rows = max(bags.offsets.diff().tolist()), sum(_length(n) for n in bags.offsets.diff().tolist())
    close_grads({k: p.grad for k, p in model.named_parameters()}, packed, _bound(_grad_depth(n_max, False, rows)),
                FAMILY, "per-bag grad", terms)


def test_masked_instances_have_no_effect():
    model = _model()
    bags = _bags()
    mask = torch.rand(bags.n_instances, generator=torch.Generator().manual_seed(5)) > 0.4
    mask[0] = True
    results = []
    terms = gradient_terms(model, lambda: model.forward_all(bags, mask=mask).logits.sum())
    for shift in (0.0, 1e3):
        features = bags.features.clone()
        features[~mask] += shift
        model.zero_grad()
        out = model.forward_all(Bags(features, bags.offsets, labels=bags.labels), mask=mask)
        out.logits.sum().backward()
        results.append((out.logits.detach(), out.attention.detach(), {k: p.grad.clone()
                                                                       for k, p in model.named_parameters()}))
    sizes = [int(m.sum()) for m in mask.split(bags.offsets.diff().tolist())]
    n_max, rows = max(sizes), sum(_length(n) for n in sizes)
    _close(results[1][0], results[0][0], _logits_depth(n_max, False), "masked rows moved: logits")
    check_per_bag(results[1][1], results[0][1], bags.offsets, _bound(_weights_depth(n_max, False)), FAMILY,
                  "masked rows moved: heatmap")  # each bag against its own largest weight
    close_grads(results[1][2], results[0][2], _bound(_grad_depth(n_max, False, rows)), FAMILY,
                "masked rows moved: grad", terms)


def test_extra_tokens_equal_instances_appended_to_their_bags():
    model = _model().eval()
    bags = _bags(sizes=(3, 1, 20))
    mask = torch.ones(bags.n_instances, dtype=torch.bool)
    mask[3] = False  # the bag of one is all masked: its tokens alone are its sequence
    h = model.embed_instances(bags.features)
    tokens = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    valid = torch.tensor([True, True, False])
    out = model.aggregate(h, bags.offsets, mask, tokens=tokens, token_valid=valid)
    rows, offsets = [], [0]
    for b in range(3):
        lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
        part = torch.cat([h[lo:hi][mask[lo:hi]], tokens[b] if valid[b] else tokens[b, :0]])
        rows.append(part)
        offsets.append(offsets[-1] + part.shape[0])
    ref = model.aggregate(torch.cat(rows), torch.tensor(offsets))
    offsets = offsets[:-1]
    n = 20  # the largest sequence (bag 2: its tokens are invalid)
    _close(out.logits, ref.logits, _logits_depth(n, False) - (D + 2), "tokens: logits")  # from h: no embedding
    _close(out.bag_embedding, ref.bag_embedding, _features_depth(n, False) - (D + 2), "tokens: embedding")
    for b in range(3):  # each bag's unmasked rows come first in its reference bag
        lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
        keep = mask[lo:hi]
        rows = slice(offsets[b], offsets[b] + int(keep.sum()))
        _close(out.attention[lo:hi][keep], ref.attention[rows], _weights_depth(n, False) - (D + 2), "tokens: heatmap")
        _close(out.instance_embedding[lo:hi][keep], ref.instance_embedding[rows], _features_depth(n, False) - (D + 2),
               "tokens: features")
    assert float(out.attention[:3].detach().sum()) < 1.0  # bag 0's tokens take a share


def test_bf16_autocast_keeps_the_attention_core_in_fp32(monkeypatch):
    """Under bf16 autocast the projections run in bf16, the Nystrom core (pseudo-inverse included) and the heatmap
    attention in fp32; the logits stay within bf16 rounding of the fp32 model's."""
    import fastmil.nn.transmil as transmil

    seen = []
    core = transmil.nystrom_attention
    monkeypatch.setattr(transmil, "nystrom_attention", lambda q, *a: seen.append(q.dtype) or core(q, *a))
    torch.manual_seed(0)
    model = TransMIL(10, embed_dim=16, n_classes=3, heads=2, landmarks=4, dropout=0.0, attn_dropout=0.0).eval()
    bags = Bags.from_list([torch.randn(n, 10) for n in (3, 30)], labels=[0, 1])
    full = model.forward_all(bags)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model.forward_all(bags)
    assert seen == [torch.float32] * 4  # two layers, two bags
    assert half.attention.dtype == torch.float32 and torch.isfinite(half.logits).all()
    # bf16 roundings on the chain into a logit (each against the fp32 model's value): a bf16 GEMM or convolution
    # rounds its two operands and its output (3 each): the embedding, per layer qkv and to_out, PPEG's three
    # convolutions, the classifier: 3 x (1 + 2 x 2 + 3 + 1) = 27; the fp32 roundings are negligible beside them
    check_close(half.logits.float(), full.logits, rounding_bound(27, torch.bfloat16), FAMILY, "bf16 autocast logits")


def test_moore_penrose_iterations_converge_to_the_inverse_of_a_softmax_kernel():
    a = torch.softmax(torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    z = moore_penrose_pinv(a, 30)  # converged after ~15 iterations: what is left is rounding
    # the pseudo-inverse's forward error is its condition number times the backward error: at the fixed point one
    # iteration's chain (5 products over 6, + 4) against the SVD's (about as long)
    condition = float(torch.linalg.cond(a).max())
    check_close(z, torch.linalg.pinv(a), 2 * rounding_bound(5 * 6 + 4, torch.float64, condition), FAMILY,
                "Newton-Schulz pseudo-inverse")


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of heads"):
        TransMIL.Config(embed_dim=30, heads=8)
    with pytest.raises(ValueError, match="nystrom or exact"):
        TransMIL.Config(attention="flash")
