"""gated_attention_pool (the fused op behind GatedAttentionPool) vs an independent fp64 reference.

Forward and every gradient (h, V, U, w and their biases), on ragged bags of sizes {1, 7, 129, 1000, 4096}
(none a multiple of any tile size but the bag of one), with no mask, a random mask and an all-masked bag, for
fp32/fp16/bf16 inputs, on both backends: ``torch`` and ``triton`` through the interpreter on CPU tensors.
"""
import pytest
import torch

from fastmil.nn import GatedAttentionPool
from fastmil.ops import attention_pool, gated_attention_pool, gated_attention_pool_reference

SIZES = [1, 7, 129, 1000, 4096]
DIM, HIDDEN = 40, 24  # neither a power of two: exercises the padded tails of every block
PARAM_NAMES = ["v_weight", "v_bias", "u_weight", "u_bias", "w_weight", "w_bias"]

# Relative to the largest reference magnitude of each tensor. Every path computes in fp32 from inputs rounded
# to the dtype (the fp64 reference sees the same rounded inputs); outputs in the input dtype (grad_h) carry one
# more rounding: 2^-11 for fp16, 2^-8 for bf16.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def _case(sizes, dtype, mask_kind, seed=0, dim=DIM, hidden=HIDDEN):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    h = torch.randn(n, dim, generator=g).to(dtype)
    params = [
        torch.randn(hidden, dim, generator=g) / dim**0.5,
        torch.randn(hidden, generator=g) * 0.1,
        torch.randn(hidden, dim, generator=g) / dim**0.5,
        torch.randn(hidden, generator=g) * 0.1,
        torch.randn(1, hidden, generator=g) * 2,  # large enough for peaked (not uniform) attention
        torch.randn(1, generator=g),
    ]
    offsets = _offsets(sizes)
    mask = None
    if mask_kind != "none":
        mask = torch.rand(n, generator=g) > 0.3
        if mask_kind == "all-masked-bag":
            mask[offsets[2] : offsets[3]] = False
    return h, params, offsets, mask


def _close(actual, expected, tol, what):
    expected = expected.detach()
    scale = float(expected.abs().max()) or 1.0
    err = float((actual.detach().double() - expected).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-masked-bag"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_and_all_gradients_match_fp64_reference(dtype, mask_kind, backend):
    h, params, offsets, mask = _case(SIZES, dtype, mask_kind)
    h1 = h.clone().requires_grad_()
    p1 = [p.clone().requires_grad_() for p in params]
    pooled, weights = gated_attention_pool(h1, *p1, offsets, mask, backend=backend)
    h64 = h.double().requires_grad_()
    p64 = [p.double().requires_grad_() for p in params]
    ref_pooled, ref_weights = gated_attention_pool_reference(h64, *p64, offsets, mask)
    tol = TOL[dtype]
    assert pooled.dtype == weights.dtype == torch.float32
    _close(pooled, ref_pooled, tol, "pooled")
    _close(weights, ref_weights, tol, "weights")

    g = torch.Generator().manual_seed(1)
    gp = torch.randn(ref_pooled.shape, generator=g, dtype=torch.float64)
    gw = torch.randn(ref_weights.shape, generator=g, dtype=torch.float64)
    ((pooled.double() * gp).sum() + (weights.double() * gw).sum()).backward()
    ((ref_pooled * gp).sum() + (ref_weights * gw).sum()).backward()
    assert h1.grad.dtype == dtype
    _close(h1.grad, h64.grad, 4 * tol, "grad h")
    for name, got, ref in zip(PARAM_NAMES[:-1], p1, p64):
        assert got.grad.dtype == torch.float32
        _close(got.grad, ref.grad, 4 * tol, f"grad {name}")
    # softmax ignores a shift of every score, so the exact gradient of w_bias is 0: compare on the scale of w
    assert abs(float(p1[5].grad)) <= 4 * tol * float(p64[4].grad.abs().max())

    if mask_kind == "all-masked-bag":
        rows = slice(int(offsets[2]), int(offsets[3]))
        assert torch.all(pooled[2] == 0) and torch.all(weights[rows] == 0)
        assert torch.all(h1.grad[rows] == 0)
    assert torch.isfinite(h1.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 128, 256])
def test_production_hidden_sizes_on_triton(hidden, dtype):
    """hidden 64/128/256 select the other tile configs (BLOCK_N 32, narrower D blocks, padded 2*HID GEMMs)."""
    h, params, offsets, mask = _case([1, 70, 33], dtype, "random", seed=7, dim=48, hidden=hidden)
    h1 = h.clone().requires_grad_()
    p1 = [p.clone().requires_grad_() for p in params]
    pooled, weights = gated_attention_pool(h1, *p1, offsets, mask, backend="triton")
    (pooled.square().sum() + weights.sum()).backward()
    h64 = h.double().requires_grad_()
    p64 = [p.double().requires_grad_() for p in params]
    ref_pooled, ref_weights = gated_attention_pool_reference(h64, *p64, offsets, mask)
    (ref_pooled.square().sum() + ref_weights.sum()).backward()
    tol = TOL[dtype]
    _close(pooled, ref_pooled, tol, "pooled")
    _close(weights, ref_weights, tol, "weights")
    _close(h1.grad, h64.grad, 4 * tol, "grad h")
    for name, got, ref in zip(PARAM_NAMES[:-1], p1, p64):
        _close(got.grad, ref.grad, 4 * tol, f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_bags_and_grad_of_params_only(backend):
    """Empty bags, a bag of one, an all-masked bag of one; h without grad (features straight from the store)."""
    h, params, offsets, _ = _case([0, 1, 3, 0, 65, 1], torch.float32, "none", seed=4)
    mask = torch.ones(h.shape[0], dtype=torch.bool)
    mask[-1] = False
    p1 = [p.clone().requires_grad_() for p in params]
    pooled, weights = gated_attention_pool(h, *p1, offsets, mask, backend=backend)
    assert torch.all(pooled[[0, 3, 5]] == 0)
    torch.testing.assert_close(pooled[1], h[0])  # a bag of one pools to itself with weight 1
    weights = weights.detach()
    assert float(weights[0]) == pytest.approx(1.0) and float(weights[-1]) == 0.0
    pooled.square().sum().backward()
    p64 = [p.double().requires_grad_() for p in params]
    gated_attention_pool_reference(h.double(), *p64, offsets, mask)[0].square().sum().backward()
    for name, got, ref in zip(PARAM_NAMES[:-1], p1, p64):
        _close(got.grad, ref.grad, 1e-4, f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_n_by_hidden_tensor_is_saved_for_backward(backend):
    """The recompute strategy: nothing with N x hidden elements (or larger, except h itself) is kept."""
    n, dim, hidden = 300, 16, 64  # hidden > dim, so an N x hidden activation would be the largest tensor
    h, params, offsets, _ = _case([100, 200], torch.float32, "none", dim=dim, hidden=hidden)
    h = h.requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pooled, _ = gated_attention_pool(h, *params, offsets, backend=backend)
    assert saved, "expected the Function to save tensors through the hooks"
    for shape, ptr in saved:
        numel = int(torch.Size(shape).numel())
        assert numel < n * hidden or ptr == h.data_ptr(), f"saved a {shape} tensor"
    pooled.sum().backward()


def test_triton_backward_is_deterministic():
    h, params, offsets, mask = _case([129, 1000], torch.float32, "random", seed=2)
    grads = []
    for _ in range(2):
        h1 = h.clone().requires_grad_()
        p1 = [p.clone().requires_grad_() for p in params]
        pooled, _ = gated_attention_pool(h1, *p1, offsets, mask, backend="triton")
        pooled.pow(3).sum().backward()
        grads.append([h1.grad, *(p.grad for p in p1)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_module_matches_unfused_chain():
    """GatedAttentionPool (fused op) equals its own scores() followed by attention_pool, values and grads."""
    torch.manual_seed(0)
    pool = GatedAttentionPool(DIM, HIDDEN)
    h, _, offsets, mask = _case([5, 77, 1], torch.float32, "random", seed=6)
    fused = pool(h, offsets, mask)
    fused[0].sum().backward()
    fused_grads = [p.grad.clone() for p in pool.parameters()]
    pool.zero_grad()
    chain = attention_pool(pool.scores(h), h, offsets, mask)
    chain[0].sum().backward()
    torch.testing.assert_close(fused[0], chain[0])
    torch.testing.assert_close(fused[1], chain[1])
    for a, p in zip(fused_grads, pool.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_bad_inputs():
    h, params, offsets, _ = _case([4], torch.float32, "none")
    with pytest.raises(ValueError, match="v_weight must have shape"):
        gated_attention_pool(h, params[0][:, :3], *params[1:], offsets)
    with pytest.raises(ValueError, match="mask must be bool"):
        gated_attention_pool(h, *params, offsets, torch.ones(4))
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        gated_attention_pool(h.double(), *params, offsets, backend="triton")
    for bad in ([0, 5], [1, 4], [0, 3, 2, 4]):  # past the end, not starting at 0, decreasing
        with pytest.raises(ValueError, match="offsets must start at 0"):
            gated_attention_pool(h, *params, torch.tensor(bad), backend="triton")
    big = [torch.zeros(257, DIM), torch.zeros(257), torch.zeros(257, DIM), torch.zeros(257), torch.zeros(1, 257),
           torch.zeros(1)]
    with pytest.raises(ValueError, match="hidden_dim <= 256"):
        gated_attention_pool(h, *big, offsets, backend="triton")
    assert torch.isfinite(gated_attention_pool(h, *big, offsets, backend="torch")[0]).all()
