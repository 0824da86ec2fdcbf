"""``linear_relu_dropout`` against ``relu(x W^T + b)`` and its autograd gradients, with the dropped entries read
off the output (an entry with a positive pre-activation is kept iff its output is non-zero), in fp64.

Also: the share of dropped entries is binomial around ``p`` (per column too), the same generator state gives the
same mask, eval mode and ``p = 0`` are exactly the ReLU of the linear map, only ``x``/``weight``/``y`` are saved for
backward, and ``gradcheck`` passes where the op is deterministic. Measured fp32 error against fp64: <= 3e-7
relative (outputs and gradients).
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

op_module = importlib.import_module("fastmil.ops.linear_relu_dropout")  # the package exports the function
TOL = 2e-6


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
    assert relative_error(y, want) <= TOL
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    for got, ref in zip(leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        assert relative_error(got.grad, ref.grad) <= TOL
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
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.linear(x, weight, bias)), atol=1e-14, rtol=0)


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
    assert relative_error(y, want) <= TOL
    y.double().square().sum().backward()
    want.square().sum().backward()
    for got, ref in zip(leaves, refs):
        assert relative_error(got.grad, ref.grad) <= TOL
    xb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in _case())
    yb = linear_relu_dropout(xb, wb, bb, 0.0, training=False)
    assert yb.dtype == torch.bfloat16
    assert relative_error(yb, torch.relu(xb.double() @ wb.double().T + bb.double())) <= 2**-7
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
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.linear(x, weight, bias)), atol=1e-6, rtol=1e-6)


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
        for got, want in zip(leaves, refs):
            assert torch.isfinite(got.grad).all()
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)
