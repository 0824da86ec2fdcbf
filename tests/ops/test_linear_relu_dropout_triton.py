"""The Triton path of ``linear_relu_dropout`` (``fastmil.kernels.linear_relu_dropout``: one GEMM with bias, ReLU and
dropout in its epilogue) through the interpreter on CPU tensors, against fp64 ``relu(x W^T + b)`` with the dropped
entries read off the output, and its autograd gradients (the backward is shared with the torch path).

Shapes put a ragged tail in every block: N = 300 rows (blocks of 64/128), D = 37 and 259 (K blocks of 32), E = 45
and 300 (column blocks of 64/128). Tolerances: fp32 inputs 2e-6 relative (measured <= 4e-7: the interpreter's dots
are full fp32); fp16/bf16 inputs one unit in the last place of the output dtype against a reference on the same
rounded inputs. The interpreter proves indexing, masking and the counter-based mask; it cannot show GPU precision
(TF32 products) or timing.
"""
import importlib
import math

import pytest
import torch

from fastmil.ops import linear_relu_dropout
from tests.ops.test_linear_relu_dropout import _case
from tests.ragged import relative_error

kernel_module = importlib.import_module("fastmil.kernels.linear_relu_dropout")
TOL = {torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _run(x, weight, bias, p, training=True, seed=5):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = linear_relu_dropout(*leaves, p, training, generator=torch.Generator().manual_seed(seed), backend="triton")
    return y, leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 37, 45), (300, 259, 300), (1, 37, 45)], ids=["tails", "wide", "one-row"])
@pytest.mark.parametrize("p", [0.25, 0.1])
def test_matches_reference_with_the_mask_it_drew(dtype, shape, p):
    n, d, e = shape
    x, weight, bias = _case(n, d, e, dtype=dtype)
    y, leaves = _run(x, weight, bias, p)
    assert y.dtype == dtype and y.shape == (n, e) and y.is_contiguous()
    pre = x.double() @ weight.double().T + bias.double()
    keep = ((y.detach() != 0) | (pre <= 0)).double()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    want = torch.relu(ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]) * keep / (1 - round(p * 65536) / 65536)
    assert relative_error(y.double(), want) <= TOL[dtype]
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    for got, ref in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype
        assert relative_error(got.grad.double(), ref.grad) <= max(TOL[dtype], 2e-6)
    if n > 1:
        observed = pre > 0
        dropped = float((keep == 0).sum()) / float(observed.sum())
        assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / float(observed.sum()))


def test_mask_is_binomial_per_column_reproducible_and_independent_of_the_blocks(monkeypatch):
    """Over 4000 x 50 entries the dropped share is p within 5 sigma in every column; the same generator state gives
    the same mask, another state another; tiles of 16 x 16 instead of 64 x 64 give the same mask (the draws are
    keyed by the entry's global index) and the same values."""
    x, weight, bias = _case(n=4000, d=20, e=50)
    bias = bias.abs() + 10  # every pre-activation positive: dropped <=> output 0
    p = 0.3
    first, _ = _run(x, weight, bias, p, seed=11)
    again, _ = _run(x, weight, bias, p, seed=11)
    other, _ = _run(x, weight, bias, p, seed=12)
    dropped = first == 0
    assert torch.equal(first, again) and not torch.equal(dropped, other == 0)
    sigma = math.sqrt(p * (1 - p) / x.shape[0])
    assert float((dropped.double().mean(0) - p).abs().max()) <= 5 * sigma
    small = kernel_module.KernelConfig(block_n=16, block_d=16, num_warps=4, num_stages=2)
    monkeypatch.setattr(kernel_module, "linear_relu_dropout_config", lambda dtype: small)
    tiled, _ = _run(x, weight, bias, p, seed=11)
    assert torch.equal(tiled == 0, dropped)
    torch.testing.assert_close(tiled, first, rtol=1e-6, atol=0)


def test_eval_p0_no_bias_and_strided_inputs():
    """Inference and p = 0 are the ReLU of the linear map exactly (no draw); without bias; x as a column slice of a
    wider matrix (its own row stride) and as a misaligned view (copied to a checked layout first)."""
    x, weight, bias = _case(n=130, d=48, e=70)
    plain = torch.relu(x.double() @ weight.double().T + bias.double())
    for training, p in ((False, 0.25), (True, 0.0)):
        y, _ = _run(x, weight, bias, p, training=training)
        assert relative_error(y.double(), plain) <= TOL[torch.float32]
    y, _ = _run(x, weight, None, 0.0)
    assert relative_error(y.double(), torch.relu(x.double() @ weight.double().T)) <= TOL[torch.float32]
    wide = torch.cat([x, torch.randn(130, 16)], 1)
    sliced = wide[:, :48]
    assert sliced.stride(0) == 64
    y, _ = _run(sliced, weight, bias, 0.0)
    assert relative_error(y.double(), plain) <= TOL[torch.float32]
    misaligned = torch.cat([torch.randn(130, 1), x], 1)[:, 1:]
    y, _ = _run(misaligned, weight, bias, 0.0)
    assert relative_error(y.double(), plain) <= TOL[torch.float32]


def test_triton_path_refuses_mixed_dtypes_and_bad_widths():
    x, weight, bias = _case()
    with pytest.raises(TypeError, match="share a dtype"):
        linear_relu_dropout(x, weight.double(), bias, 0.1, True, backend="triton")
    with pytest.raises(ValueError, match="D >= 2"):
        linear_relu_dropout(x[:, :1], weight[:, :1], bias, 0.1, True, backend="triton")
