"""ABMIL on packed bags equals per-bag and padded+mask evaluation, outputs and gradients (tolerance 1e-5)."""
import pytest
import torch

from fastmil import Bags
from fastmil.nn import ABMIL, GatedAttentionPool, MeanPoolMIL, MILOutput

SIZES = [1, 7, 129, 40]
TOL = dict(atol=1e-5, rtol=1e-5)


def _bags(d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Bags.from_list([torch.randn(n, d, generator=g) for n in SIZES], labels=[0, 1, 1, 0])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


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

    model.zero_grad()
    total = 0
    for b in range(len(bags)):
        one = bags[b]
        lb, wb = model(one)
        torch.testing.assert_close(lb[0], logits[b], **TOL)
        torch.testing.assert_close(wb, weights[bags.offsets[b] : bags.offsets[b + 1]], **TOL)
        total = total + torch.nn.functional.cross_entropy(lb, target[b : b + 1], reduction="sum")
    total.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, packed_grads[name], **TOL, msg=f"per-bag grad {name}")

    model.zero_grad()
    X, mask = bags.to_padded(pad_value=123.0)  # padding content must not leak in
    n_max = X.shape[1]
    offsets = torch.arange(0, (len(bags) + 1) * n_max, n_max, dtype=torch.int64)
    lp, wp = model(X.reshape(-1, X.shape[-1]), offsets, mask.reshape(-1))
    torch.testing.assert_close(lp, logits, **TOL)
    torch.testing.assert_close(wp.reshape(mask.shape)[mask], weights, **TOL)
    assert torch.all(wp.reshape(mask.shape)[~mask] == 0)
    torch.nn.functional.cross_entropy(lp, target, reduction="sum").backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, packed_grads[name], **TOL, msg=f"padded grad {name}")


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
    torch.testing.assert_close(logits[2], model.classifier(torch.zeros(16)))


def test_gated_pool_matches_its_definition_and_mean_pool_is_uniform():
    torch.manual_seed(1)
    pool = GatedAttentionPool(6, 4)
    assert pool.V.out_features == 4 and pool.U.in_features == 6 and pool.w.out_features == 1
    h, offsets = torch.randn(10, 6), torch.tensor([0, 3, 10])
    pooled, w = pool(h, offsets)
    for b, (lo, hi) in enumerate([(0, 3), (3, 10)]):
        x = h[lo:hi]
        a = torch.softmax(pool.w(torch.tanh(pool.V(x)) * torch.sigmoid(pool.U(x)))[:, 0], dim=0)
        torch.testing.assert_close(w[lo:hi], a)
        torch.testing.assert_close(pooled[b], a @ x)
    _, wm = MeanPoolMIL(6, 4)(torch.randn(10, 6), torch.tensor([0, 4, 10]))
    torch.testing.assert_close(wm, torch.tensor([0.25] * 4 + [1 / 6] * 6))


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
    torch.testing.assert_close(model.instance_logits(out), want, atol=1e-12, rtol=0)


def test_instance_logits_keep_tiny_attention_terms_with_bf16_embeddings():
    """With bf16 instance embeddings (autocast), a_i W h_i ~ 1e-5 must survive the bias add: the logits are fp32
    and equal the fp64 value of the same bf16 inputs to fp32 accuracy (measured 6.5e-7, from the bf16 GEMM
    output; adding in bf16: 5.5e-5)."""
    torch.manual_seed(0)
    model = ABMIL(16, n_classes=3).eval()
    n = 50_000
    h = torch.rand(n, model.embedding_dim).bfloat16()
    attention = torch.softmax(torch.randn(n), 0)
    out = MILOutput(logits=None, attention=attention, bag_embedding=None, instance_embedding=h)
    with torch.no_grad():
        got = model.instance_logits(out)
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    want = (h.double() @ weight.bfloat16().double().T) * attention.double()[:, None] + bias.double()
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= 2e-6
