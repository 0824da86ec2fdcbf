"""ABMIL on packed bags equals per-bag and padded+mask evaluation, outputs and gradients (bounds derived as
tests/tolerance.py says)."""
import pytest
import torch

from fastmil import Bags
from fastmil.nn import ABMIL, GatedAttentionPool, MeanPoolMIL, MILOutput
from tests.tolerance import check, check_close, check_per_bag, output_rounding, rounding_bound

SIZES = [1, 7, 129, 40]
FAMILY = "nn.abmil"


def _weights_depth(d, e, a, n):
    """Roundings into one attention weight: the embedding GEMM over d (+ bias, ReLU), the V/U GEMMs over e (+ bias,
    tanh / sigmoid, product), the w GEMM over a (+ bias), the softmax over the bag's n rows (+ max, exp, divide)."""
    return d + 2 + e + 4 + a + 1 + n + 3


def _logits_depth(d, e, a, n):
    """... then the pooled sum over the n rows and the classifier GEMM over e (+ bias)."""
    return _weights_depth(d, e, a, n) + n + e + 1


def _grad_depth(d, e, a, c, n, total):
    """A parameter's gradient: the forward chain, the cross-entropy's softmax over c (+ 3), the classifier backward
    over c, dL/da_i over e, the softmax backward over n, the score backward over a (V and U paths: 2a, + 4
    elementwise), and the sum over all ``total`` rows of the batch into the parameter."""
    return _logits_depth(d, e, a, n) + c + 3 + c + e + n + 2 * a + 4 + total


def _bags(d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Bags.from_list([torch.randn(n, d, generator=g) for n in SIZES], labels=[0, 1, 1, 0])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _score_path_scales(model, bags, logits, weights, target):
    """The magnitude of the terms behind each attention-score parameter's gradient, the normaliser of its error.

    That gradient is a sum over rows, ``sum_i ds_i (d s_i / d p)``, of the score gradients ``ds_i = a_i (u_i - c)``
    (``u_i = g . h_i``, ``c = sum_j a_j u_j``, ``g`` = dL/dpooled), which cancel: they sum to exactly 0 over a bag,
    so the w bias's gradient is rounding alone, and the V bias's is ~50x smaller than its terms. Its rounding error
    is relative to ``sum_i |ds_i (d s_i / d p)|`` (the policy's normaliser of a reduction); that sum's largest
    entry is the scale (>= the gradient's own largest entry: the condition of the sum is built in)."""
    with torch.no_grad():
        h = model.embed(bags.features)
        g = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, logits.shape[1])) @ model.classifier.weight
        bag = torch.repeat_interleave(torch.arange(len(bags)), bags.offsets.diff())
        u = (h * g[bag]).sum(-1)
        c = torch.zeros(len(bags)).index_add(0, bag, weights * u)
        ds = weights * (u - c[bag])
    names, params = zip(*model.pool.named_parameters())
    scores = model.pool.scores(h)
    jac = torch.autograd.grad(scores, params, torch.eye(scores.shape[0]), is_grads_batched=True)  # d s_i / d p
    return {f"pool.{n}": float(torch.einsum("i,i...->...", ds.abs(), j.abs()).max()) for n, j in zip(names, jac)}


@pytest.mark.parametrize("gated", [True, False])
def test_packed_equals_per_bag_and_padded(gated):
    torch.manual_seed(0)
    model = ABMIL(24, embed_dim=32, attn_dim=16, n_classes=3, gated=gated, dropout=0.0)
    bags = _bags()
    target = torch.tensor([0, 2, 1, 1])

    logits, weights = model(bags)
    torch.nn.functional.cross_entropy(logits, target, reduction="sum").backward()
    packed_grads = _grads(model)
    assert logits.shape == (4, 3) and weights.shape == (bags.n_instances,)
    scales = _score_path_scales(model, bags, logits.detach(), weights.detach(), target)

    # both sides are computed in fp32 with their own rounding orders: each comparison allows twice one chain's bound
    shape = dict(d=24, e=32, a=16)
    n_max, n_total = max(SIZES), sum(SIZES)
    model.zero_grad()
    total = 0
    for b in range(len(bags)):
        one = bags[b]
        lb, wb = model(one)
        n = SIZES[b]
        check_close(lb[0], logits[b], 2 * rounding_bound(_logits_depth(**shape, n=n)), FAMILY, f"per-bag logits {b}")
        check_close(wb, weights[bags.offsets[b] : bags.offsets[b + 1]],
                    2 * rounding_bound(_weights_depth(**shape, n=n)), FAMILY, f"per-bag weights {b}")
        total = total + torch.nn.functional.cross_entropy(lb, target[b : b + 1], reduction="sum")
    total.backward()
    grad_bound = 2 * rounding_bound(_grad_depth(**shape, c=3, n=n_max, total=n_total))
    for name, g in _grads(model).items():
        check_close(g, packed_grads[name], grad_bound, FAMILY, f"per-bag grad {name}", scale=scales.get(name))

    model.zero_grad()
    X, mask = bags.to_padded(pad_value=123.0)  # padding content must not leak in
    n_pad = X.shape[1]
    offsets = torch.arange(0, (len(bags) + 1) * n_pad, n_pad, dtype=torch.int64)
    lp, wp = model(X.reshape(-1, X.shape[-1]), offsets, mask.reshape(-1))
    check_close(lp, logits, 2 * rounding_bound(_logits_depth(**shape, n=n_max)), FAMILY, "padded logits")
    check_per_bag(wp.reshape(mask.shape)[mask], weights, bags.offsets,  # each bag against its own largest weight
                  2 * rounding_bound(_weights_depth(**shape, n=n_max)), FAMILY, "padded weights")
    assert torch.all(wp.reshape(mask.shape)[~mask] == 0)
    torch.nn.functional.cross_entropy(lp, target, reduction="sum").backward()
    # the padded batch's gradient sums run over its len(bags) * n_max rows (masked rows add exact zeros)
    grad_bound = 2 * rounding_bound(_grad_depth(**shape, c=3, n=n_max, total=len(bags) * n_max))
    for name, g in _grads(model).items():
        check_close(g, packed_grads[name], grad_bound, FAMILY, f"padded grad {name}", scale=scales.get(name))


def test_bag_of_one_gets_all_attention():
    model = ABMIL(8, embed_dim=8, attn_dim=4, dropout=0.0)
    _, w = model(Bags.from_list([torch.randn(1, 8)]))
    assert w.tolist() == [1.0]


def test_fp16_features_and_mask():
    """fp16 features are cast to the fp32 parameters: the same numbers as the fp16-rounded features in fp32,
    and a masked bag gets zero attention and the logits of an empty (all-zero) pooled vector."""
    torch.manual_seed(0)
    model = ABMIL(24, embed_dim=16, attn_dim=8, dropout=0.0)
    bags = _bags()
    mask = torch.ones(bags.n_instances, dtype=torch.bool)
    mask[bags.offsets[2] : bags.offsets[3]] = False
    logits, w = model(bags.features.half(), bags.offsets, mask)
    ref_logits, ref_w = model(bags.features.half().float(), bags.offsets, mask)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=0, rtol=0)
    assert torch.all(w[bags.offsets[2] : bags.offsets[3]] == 0)
    # exact: the masked bag pools to exact zeros, and W 0 + b is b in any summation order
    torch.testing.assert_close(logits[2], model.classifier(torch.zeros(16)), atol=0, rtol=0)


def test_gated_pool_matches_its_definition_and_mean_pool_is_uniform():
    torch.manual_seed(1)
    pool = GatedAttentionPool(6, 4)
    assert pool.V.out_features == 4 and pool.U.in_features == 6 and pool.w.out_features == 1
    h, offsets = torch.randn(10, 6), torch.tensor([0, 3, 10])
    pooled, w = pool(h, offsets)
    for b, (lo, hi) in enumerate([(0, 3), (3, 10)]):
        x = h[lo:hi]
        a = torch.softmax(pool.w(torch.tanh(pool.V(x)) * torch.sigmoid(pool.U(x)))[:, 0], dim=0)
        # fused op and torch reference, both fp32 (twice the bound): V/U over 6 (+ 4 elementwise), w over 4 (+ bias),
        # the softmax over the bag's n rows (+ 3); the pooled vector adds the sum over n
        n = hi - lo
        depth = 6 + 4 + 4 + 1 + n + 3
        check_close(w[lo:hi], a, 2 * rounding_bound(depth), FAMILY, "gated pool weights")
        check_close(pooled[b], a @ x, 2 * rounding_bound(depth + n), FAMILY, "gated pool pooled")
    _, wm = MeanPoolMIL(6, 4)(torch.randn(10, 6), torch.tensor([0, 4, 10]))
    # equal scores: the softmax over the bag's n <= 6 rows (+ exp, divide) against 1/n rounded once
    check_close(wm, torch.tensor([0.25] * 4 + [1 / 6] * 6), rounding_bound(6 + 3), FAMILY, "mean pool weights")


def test_forward_argument_errors():
    model = ABMIL(4, embed_dim=4, attn_dim=2)
    with pytest.raises(TypeError, match="needs offsets"):
        model(torch.randn(3, 4))
    with pytest.raises(ValueError, match="n_classes"):
        ABMIL(4, n_classes=1)


@pytest.mark.parametrize("gated", [True, False])
def test_float64_abmil_passes_gradcheck(gated):
    torch.manual_seed(3)
    model = ABMIL(5, embed_dim=6, attn_dim=3, n_classes=3, gated=gated, dropout=0.0).double()
    bags = Bags.from_list([torch.randn(n, 5, dtype=torch.float64) for n in (1, 4, 6)])
    x = bags.features.clone().requires_grad_()
    logits, weights = model(x, bags.offsets)
    assert logits.dtype == weights.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda f: model(f, bags.offsets)[0], (x,))
    params = list(model.parameters())
    assert torch.autograd.gradcheck(
        lambda *p: torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], p)),
                                              (bags.features, bags.offsets))[0], tuple(params))


def test_forward_all_is_one_pass_that_forward_reuses():
    torch.manual_seed(4)
    model = ABMIL(5, embed_dim=6, attn_dim=3, dropout=0.0)
    bags = _bags(d=5)
    out = model.forward_all(bags)
    logits, weights = model(bags)
    torch.testing.assert_close(out.logits, logits, atol=0, rtol=0)
    torch.testing.assert_close(out.attention, weights, atol=0, rtol=0)
    torch.testing.assert_close(out.instance_embedding, model.embed(bags.features), atol=0, rtol=0)
    torch.testing.assert_close(out.logits, model.classifier(out.bag_embedding), atol=0, rtol=0)
    calls = []
    handle = model.embed.register_forward_hook(lambda *a: calls.append(1))
    model.forward_all(bags)
    handle.remove()
    assert calls == [1]  # the instances are embedded once per forward


@pytest.mark.parametrize("model_cls", [ABMIL, MeanPoolMIL])
def test_instance_logits_are_the_classifier_of_weighted_embeddings(model_cls):
    """MHIM's class-aware instance logits: classifier(a_i h_i), computed without scaling the N x E embeddings."""
    torch.manual_seed(0)
    model = model_cls(12, n_classes=3).double().eval()
    bags = Bags.from_list([torch.randn(5, 12, dtype=torch.float64), torch.randn(1, 12, dtype=torch.float64)])
    out = model.forward_all(bags)
    want = model.classifier(out.attention[:, None] * out.instance_embedding)
    # fp64, a_i (W h_i) + b against W (a_i h_i) + b: on each side the GEMM over E = 512 plus the scaling and the
    # bias add; two computed sides: twice the bound
    depth = model.embedding_dim + 2
    check_close(model.instance_logits(out), want, 2 * rounding_bound(depth, torch.float64), FAMILY,
                "instance logits fp64")


def test_instance_logits_keep_tiny_attention_terms_with_bf16_embeddings():
    """With bf16 instance embeddings (autocast), a_i W h_i ~ 1e-5 must survive the bias add: the logits are fp32
    and equal the fp64 value of the same bf16 inputs up to the rounding of the bf16 GEMM's output (one bf16 ulp of
    a_i W h_i) plus fp32 rounding (measured 6.5e-7; adding in bf16: 5.5e-5)."""
    torch.manual_seed(0)
    model = ABMIL(16, n_classes=3).eval()
    n = 50_000
    h = torch.rand(n, model.embedding_dim).bfloat16()
    attention = torch.softmax(torch.randn(n), 0)
    out = MILOutput(logits=None, attention=attention, bag_embedding=None, instance_embedding=h)
    with torch.no_grad():
        got = model.instance_logits(out)
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    projected = h.double() @ weight.bfloat16().double().T  # the fp64 value of the bf16 GEMM
    want = projected * attention.double()[:, None] + bias.double()
    assert got.dtype == torch.float32
    # the GEMM accumulates over E in fp32 and stores bf16: one bf16 ulp of the largest a_i W h_i (the output's
    # rounding, scaled by a_i); then fp32 rounding of the E-term sum, the scaling and the bias add (E + 2) on the
    # logits' scale
    tiny = float((projected * attention.double()[:, None]).abs().max())
    bound = output_rounding(torch.bfloat16) * tiny + rounding_bound(model.embedding_dim + 2) * float(want.abs().max())
    check(float((got.double() - want).abs().max()), bound, FAMILY, "bf16 instance logits")
