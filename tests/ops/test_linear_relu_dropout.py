"""``linear_relu_dropout`` against ``relu(x W^T + b)`` and its autograd gradients, with the dropped entries read
off the output (an entry with a positive pre-activation is kept iff its output is non-zero), in fp64.

Also: the share of dropped entries is binomial around ``p`` (per column too), the same generator state gives the
same mask, eval mode and ``p = 0`` are exactly the ReLU of the linear map, only ``x``/``weight``/``y`` are saved for
backward, and ``gradcheck`` passes where the op is deterministic. Tolerances follow tests/tolerance.py: the output is
a GEMM over D (depth D + 2 with the bias and the scale), ``grad x`` one over E, ``grad W`` and ``grad b`` sums over
the N rows; each relative to its largest reference value, times the GEMM's cancellation (``_bound``).
"""
import importlib
import math

import numpy as np
import pytest
import torch

from fastmil.nn import EmbedBlock
from fastmil.ops import linear_relu_dropout
from fastmil.ops.linear_relu_dropout import dropout_threshold, keep_rule
from tests.ragged import relative_error
from tests.tolerance import check, family_of, output_rounding, rounding_bound

op_module = importlib.import_module("fastmil.ops.linear_relu_dropout")  # the package exports the function
FAMILY = "linear_relu_dropout"


def _bound(depth, magnitude, expected, dtype=torch.float32):
    """``rounding_bound(depth)`` of a GEMM result, times its cancellation: the largest magnitude of the terms it sums
    (``magnitude``, the same GEMM on absolute values) over its largest value."""
    top = float(expected.detach().abs().max()) if expected.numel() else 0.0
    condition = max(float(magnitude.max()) / top, 1.0) if top > 0 else 1.0
    return rounding_bound(depth, dtype, condition=condition)


def _check_all(y, want, leaves, ref_leaves, upstream, keep_scale, what=""):
    """y and each leaf's gradient against the fp64 reference. ``keep_scale``: the 0 / 1/(1-p) factor of every
    entry (dropout and ReLU), ``upstream`` the gradient of y."""
    x, weight = (t.detach().double().abs() for t in ref_leaves[:2])
    bias = ref_leaves[2].detach().double().abs() if len(ref_leaves) > 2 else 0.0
    check(relative_error(y, want), _bound(x.shape[1] + 2, x @ weight.T + bias, want), FAMILY, f"y {what}")
    g = (upstream.abs() * keep_scale).double()
    magnitudes = [g @ weight, g.T @ x, g.sum(0)]
    depths = [weight.shape[0] + 2, x.shape[0] + 2, x.shape[0] + 2]
    for name, got, ref, mag, depth in zip(("x", "weight", "bias"), leaves, ref_leaves, magnitudes, depths):
        assert got.grad.dtype == got.dtype
        check(relative_error(got.grad, ref.grad), _bound(depth, mag, ref.grad), FAMILY, f"grad {name} {what}")


def _case(n=300, d=37, e=45, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(e, d, generator=g, dtype=torch.float64) / d**0.5
    bias = torch.randn(e, generator=g, dtype=torch.float64) * 0.1
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def _reference(x, weight, bias, keep, p):
    """fp64 autograd through relu(x W^T + b) * keep / (1 - p_applied), p_applied = p on the 1/65536 grid."""
    return torch.relu(x @ weight.T + bias) * keep / (1 - round(p * 65536) / 65536)


@pytest.mark.parametrize("p", [0.25, 0.1, 0.5])
@pytest.mark.parametrize("layout", ["contiguous", "column-slice"])
@pytest.mark.parametrize("chunk_rows", [4096, 64], ids=["one-chunk", "chunks-with-tail"])
def test_training_matches_reference_with_the_mask_it_drew(p, layout, chunk_rows, monkeypatch):
    monkeypatch.setattr(op_module, "CHUNK_ROWS", chunk_rows)  # 300 rows: one chunk, or 4 of 64 and a tail of 44
    x, weight, bias = _case()
    if layout == "column-slice":
        x = torch.cat([x, torch.randn_like(x)], 1)[:, : x.shape[1]]
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    torch.manual_seed(5)
    y = linear_relu_dropout(*leaves, p, training=True)
    pre = x.double() @ weight.double().T + bias.double()
    keep = ((y.detach() != 0) | (pre <= 0)).double()  # a non-positive pre-activation gives 0 either way
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    want = _reference(*ref_leaves, keep, p)
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    _check_all(y, want, leaves, ref_leaves, upstream, keep * (pre > 0) / (1 - round(p * 65536) / 65536))
    observed = pre > 0  # where a drop is visible
    dropped = float((keep == 0).sum()) / float(observed.sum())
    assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / float(observed.sum()))


@pytest.mark.parametrize("p", [0.3, 0.25])  # 16 random bits per entry; 8 for p on the 1/256 grid
def test_dropped_share_is_binomial_per_column_and_reproducible(p):
    """Over 200k entries the dropped share is p within 5 sigma, in every column too; same seed, same mask."""
    x, weight, bias = _case(n=4000, e=50)
    bias = bias.abs() + 10  # every pre-activation positive: dropped <=> output 0
    torch.manual_seed(11)
    first = linear_relu_dropout(x, weight, bias, p, training=True) == 0
    torch.manual_seed(11)
    again = linear_relu_dropout(x, weight, bias, p, training=True) == 0
    other = linear_relu_dropout(x, weight, bias, p, training=True) == 0
    assert torch.equal(first, again) and not torch.equal(first, other)
    share = first.double().mean(0)
    sigma = math.sqrt(p * (1 - p) / x.shape[0])
    assert float((share - p).abs().max()) <= 5 * sigma
    assert abs(float(first.double().mean()) - p) <= 5 * sigma / math.sqrt(weight.shape[0])
    assert dropout_threshold(0.25) == -32768 + 16384


@pytest.mark.parametrize(("p", "bits_dtype", "threshold"), [(0.3, np.int16, -32768 + 19661), (0.25, np.uint8, 64)])
def test_cpu_draw_is_pcg64_keyed_by_two_draws_of_the_generator(p, bits_dtype, threshold):
    """The CPU keep mask is PCG64's raw output keyed by two int64 draws of the caller's generator (an independent
    re-implementation of the draw here), read as int16 against the threshold, or, for p on the 1/256 grid, as
    uint8 (the same probability from half the bits): dropped below round(p 65536) - 32768, or below round(p 256)."""
    x, weight, bias = _case(n=300, e=50)
    bias = bias.abs() + 10  # every pre-activation positive: dropped <=> output 0
    dropped = linear_relu_dropout(x, weight, bias, p, training=True, generator=torch.Generator().manual_seed(7)) == 0
    g = torch.Generator().manual_seed(7)
    key = torch.empty(2, dtype=torch.int64).random_(generator=g).tolist()
    per_word = 8 // np.dtype(bits_dtype).itemsize
    words = np.random.PCG64(np.random.SeedSequence(key)).random_raw((300 * 50 + per_word - 1) // per_word)
    bits = torch.from_numpy(words.view(bits_dtype)[: 300 * 50].astype(np.int64)).view(300, 50)
    assert torch.equal(dropped, bits < threshold)
    assert keep_rule(p) == ((torch.int16, dropout_threshold(p)) if bits_dtype == np.int16 else (torch.uint8, 64))


@pytest.mark.parametrize("mode", ["eval", "p0"])
def test_without_dropout_it_is_the_relu_of_the_linear_map(mode):
    x, weight, bias = _case(dtype=torch.float64)
    y = linear_relu_dropout(x, weight, bias, 0.0 if mode == "p0" else 0.25, training=mode == "p0")
    want = torch.relu(torch.nn.functional.linear(x, weight, bias))
    # two fp64 GEMMs over D (the op's addmm, F.linear's): each within its bound, the pair within twice
    magnitude = x.abs() @ weight.abs().T + bias.abs()
    check(relative_error(y, want), 2 * _bound(x.shape[1] + 2, magnitude, want, torch.float64), FAMILY, "fp64 y")


def test_gradcheck_fp64():
    x, weight, bias = (t.requires_grad_() for t in _case(n=9, d=5, e=4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: linear_relu_dropout(a, b, c, 0.0, training=True),
                                    (x, weight, bias))


def test_saves_only_input_weight_and_output():
    """No ReLU output or dropout mask is kept: the saved tensors are x, weight and y itself."""
    x, weight, bias = _case()
    weight.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = linear_relu_dropout(x, weight, bias, 0.25, training=True)
    assert len(saved) == 3
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), weight.data_ptr(), y.data_ptr()}


def test_embed_block_keeps_the_sequential_state_dict_keys():
    """Checkpoints written with nn.Sequential(Linear, ReLU, Dropout) load into EmbedBlock and give the same output."""
    torch.manual_seed(0)
    old = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Dropout(0.25)).eval()
    block = EmbedBlock(6, 4, 0.25).eval()
    block.load_state_dict(old.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(block(x), old(x), atol=0, rtol=0)
    assert set(block.state_dict()) == {"0.weight", "0.bias"}


def test_bad_arguments():
    x, weight, bias = _case()
    with pytest.raises(ValueError, match="x \\[N, D\\] and weight"):
        linear_relu_dropout(x, weight[:, 1:], bias, 0.1, True)
    with pytest.raises(ValueError, match="p must be"):
        linear_relu_dropout(x, weight, bias, 1.0, True)


def test_without_bias_and_in_bf16():
    """No bias (fp64 reference), and bf16 inputs: outputs and gradients in bf16 within its rounding."""
    x, weight, _ = _case()
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    y = linear_relu_dropout(leaves[0], leaves[1], None, 0.0, training=True)
    refs = [t.detach().double().requires_grad_() for t in (x, weight)]
    want = torch.relu(refs[0] @ refs[1].T)
    y.double().square().sum().backward()
    want.square().sum().backward()
    # d(sum y^2)/dy = 2y: the upstream gradient is 2 |y| where y > 0
    _check_all(y, want, leaves, refs, 2 * want.detach(), (want.detach() > 0).double(), "no bias")
    xb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in _case())
    yb = linear_relu_dropout(xb, wb, bb, 0.0, training=False)
    assert yb.dtype == torch.bfloat16
    # fp32 accumulation, then one rounding of y to bf16 (one unit of its last place)
    want_b = torch.relu(xb.double() @ wb.double().T + bb.double())
    magnitude = xb.double().abs() @ wb.double().abs().T + bb.double().abs()
    check(relative_error(yb, want_b), _bound(xb.shape[1] + 2, magnitude, want_b) + output_rounding(torch.bfloat16),
          family_of(FAMILY, torch.bfloat16), "y")
    yb.float().sum().backward()
    assert xb.grad.dtype == wb.grad.dtype == bb.grad.dtype == torch.bfloat16


def test_extreme_and_tiny_p_and_backend():
    """p that the 16-bit draws cannot apply below 1 is refused (it used to keep everything and scale by 2^17);
    a p below half a step applies as 0: nothing dropped, nothing scaled."""
    x, weight, bias = _case()
    with pytest.raises(ValueError, match="dropout p must be"):
        linear_relu_dropout(x, weight, bias, 0.999999, training=True)
    with pytest.raises(ValueError, match="dropout p must be"):
        EmbedBlock(6, 4, 1.0)
    y = linear_relu_dropout(x, weight, bias, 1e-6, training=True)
    want = torch.relu(torch.nn.functional.linear(x, weight, bias))
    # two fp32 GEMMs over D (the op's, F.linear's): each within its bound, the pair within twice
    magnitude = x.double().abs() @ weight.double().abs().T + bias.double().abs()
    check(relative_error(y, want), 2 * _bound(x.shape[1] + 2, magnitude, want.double()), FAMILY, "p below a step")


@pytest.mark.parametrize("n", [0, 300])
def test_weight_gradient_is_written_without_a_zero_fill(n, nan_filled_empty, monkeypatch):
    """The backward writes ``grad_w`` with its first chunk's GEMM (``beta = 0``) instead of zero-filling it: with
    uninitialised memory read as NaN, one chunk, several chunks with a tail, and an empty ``x`` (no chunk: zeros)
    all give finite gradients equal to autograd's through the module chain."""
    x, weight, bias = _case(dtype=torch.float64)
    x = x[:n]
    for chunk_rows in (4096, 64):
        monkeypatch.setattr(op_module, "CHUNK_ROWS", chunk_rows)
        leaves = [t.detach().clone().requires_grad_() for t in (weight, bias)]
        refs = [t.detach().clone().requires_grad_() for t in (weight, bias)]
        y = linear_relu_dropout(x, *leaves, 0.0, training=True)
        assert y.shape == (n, weight.shape[0])
        y.sum().backward()
        torch.relu(x @ refs[0].T + refs[1]).sum().backward()
        keep = (x @ weight.T + bias > 0).double()
        # fp64 sums over the N rows (the op's chunked addmm, autograd's one GEMM): the pair within twice the bound
        for got, want, magnitude in zip(leaves, refs, (keep.T @ x.abs(), keep.sum(0))):
            assert torch.isfinite(got.grad).all()
            check(relative_error(got.grad, want.grad), 2 * _bound(max(n, 1) + 2, magnitude, want.grad, torch.float64),
                  FAMILY, "fp64 weight gradient without a zero fill")
