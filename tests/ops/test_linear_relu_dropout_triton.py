"""The Triton path of ``linear_relu_dropout`` (``fastmil.kernels.linear_relu_dropout``: one GEMM with bias, ReLU and
dropout in its epilogue) through the interpreter on CPU tensors, against fp64 ``relu(x W^T + b)`` with the dropped
entries read off the output, and its autograd gradients (the backward is shared with the torch path).

Shapes put a ragged tail in every block: N = 300 rows (blocks of 64/128), D = 37 and 259 (K blocks of 32), E = 45
and 300 (column blocks of 64/128). Tolerances follow tests/tolerance.py (``_bound`` of test_linear_relu_dropout.py:
the GEMM's depth times its cancellation); fp16/bf16 inputs add one unit in the last place of the output dtype (and,
for the gradients, of the upstream gradient rounded to that dtype) against a reference on the same rounded inputs.
The interpreter proves indexing, masking and the counter-based mask; it cannot show GPU precision (TF32 products)
or timing.
"""
import importlib
import math

import pytest
import torch
import triton
import triton.language as tl

from fastmil.ops import linear_relu_dropout
from tests.ops.test_linear_relu_dropout import FAMILY, _bound, _case
from tests.ragged import relative_error
from tests.tolerance import LAMBDA, check, family_of, half_rounding, unit_roundoff

kernel_module = importlib.import_module("fastmil.kernels.linear_relu_dropout")


def _y_bound(x, weight, bias, want, dtype=torch.float32):
    """y: a GEMM over D with the bias (depth D + 2), then its rounding to ``dtype``."""
    magnitude = x.double().abs() @ weight.double().abs().T + (0.0 if bias is None else bias.double().abs())
    return _bound(x.shape[1] + 2, magnitude, want) + half_rounding(dtype)


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
    family = family_of(FAMILY, dtype)
    check(relative_error(y.double(), want), _y_bound(x, weight, bias, want, dtype), family, "triton y")
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    g = upstream.abs() * keep * (pre > 0) / (1 - round(p * 65536) / 65536)
    xa, wa = x.double().abs(), weight.double().abs()
    for name, got, ref, mag, depth in zip(("x", "weight", "bias"), leaves, ref_leaves, (g @ wa, g.T @ xa, g.sum(0)),
                                          (e + 2, n + 2, n + 2)):
        assert got.grad.dtype == dtype
        # the upstream gradient reaches the backward rounded to the dtype, and the result is rounded to it
        half = 2 * half_rounding(dtype) * float(mag.max()) / float(ref.grad.abs().max())
        check(relative_error(got.grad.double(), ref.grad), _bound(depth, mag, ref.grad) + half, family,
              f"triton grad {name}")
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
    # two tilings of the same GEMM (other summation orders): the pair within twice the bound
    check(relative_error(tiled, first), 2 * _y_bound(x, weight, bias, first.double()), FAMILY, "triton other tiles")


def test_eval_p0_no_bias_and_strided_inputs():
    """Inference and p = 0 are the ReLU of the linear map exactly (no draw); without bias; x as a column slice of a
    wider matrix (its own row stride) and as a misaligned view (copied to a checked layout first)."""
    x, weight, bias = _case(n=130, d=48, e=70)
    plain = torch.relu(x.double() @ weight.double().T + bias.double())
    bound = _y_bound(x, weight, bias, plain)
    for training, p in ((False, 0.25), (True, 0.0)):
        y, _ = _run(x, weight, bias, p, training=training)
        check(relative_error(y.double(), plain), bound, FAMILY, "triton y without dropout")
    y, _ = _run(x, weight, None, 0.0)
    no_bias = torch.relu(x.double() @ weight.double().T)
    check(relative_error(y.double(), no_bias), _y_bound(x, weight, None, no_bias), FAMILY, "triton y without bias")
    wide = torch.cat([x, torch.randn(130, 16)], 1)
    sliced = wide[:, :48]
    assert sliced.stride(0) == 64
    y, _ = _run(sliced, weight, bias, 0.0)
    check(relative_error(y.double(), plain), bound, FAMILY, "triton y of a column slice")
    misaligned = torch.cat([torch.randn(130, 1), x], 1)[:, 1:]
    y, _ = _run(misaligned, weight, bias, 0.0)
    check(relative_error(y.double(), plain), bound, FAMILY, "triton y of a misaligned view")


def test_triton_path_refuses_mixed_dtypes_and_bad_widths():
    x, weight, bias = _case()
    with pytest.raises(TypeError, match="share a dtype"):
        linear_relu_dropout(x, weight.double(), bias, 0.1, True, backend="triton")
    with pytest.raises(ValueError, match="D >= 2"):
        linear_relu_dropout(x[:, :1], weight[:, :1], bias, 0.1, True, backend="triton")


@triton.jit
def _philox_bits_kernel(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Reference draws: ``tl.randint(seed, i)`` for every entry index ``i`` (what the keep rule reads)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, tl.randint(tl.load(seed_ptr), idx.to(tl.int64)), mask=idx < n)


@pytest.mark.parametrize("p", [0.3, 0.1])
def test_mask_is_exactly_the_philox_rule_on_each_entry_index(p):
    """The dropped entries are exactly those whose draw ``randint(seed, row * E + col)`` has low 16 bits, taken as
    a uniform value in [-32768, 32767], below ``-32768 + round(p 65536)``, with the seed the op draws from its
    generator (replayed here)."""
    n, e = 200, 70
    x, weight, bias = _case(n=n, d=20, e=e)
    bias = bias.abs() + 10  # every pre-activation positive: dropped <=> output 0
    y, _ = _run(x, weight, bias, p, seed=3)
    seed = torch.zeros(1, dtype=torch.int64).random_(generator=torch.Generator().manual_seed(3))
    bits = torch.zeros(n * e, dtype=torch.int32)
    _philox_bits_kernel[(triton.cdiv(n * e, 1024),)](seed, bits, n * e, BLOCK=1024)
    draw = (bits.to(torch.int64) & 0xFFFF) - 32768
    threshold = -32768 + round(p * 65536)
    assert torch.equal((y == 0).flatten(), draw < threshold)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_features_give_nan_rows_on_both_paths(backend):
    """A NaN feature makes its row's outputs NaN (kept or dropped), as torch's Linear/ReLU/Dropout would: the
    kernel must not turn it into 0 (``max(NaN, 0)`` and ``NaN * 0``)."""
    x, weight, bias = _case(n=70, d=20, e=40)
    x[5, 3] = float("nan")
    y = linear_relu_dropout(x, weight, bias, 0.5, True, generator=torch.Generator().manual_seed(0), backend=backend)
    assert torch.isnan(y[5]).all() and not torch.isnan(y[torch.arange(70) != 5]).any()


def test_features_of_another_dtype_are_converted_in_registers():
    """Under autocast the launch gets fp32 features with fp16 weights (the compute dtype): the kernel converts x
    tile by tile; y equals the fp16-input result."""
    x, weight, bias = _case(n=130, d=48, e=70)
    w16, b16 = weight.half(), bias.half()
    y = torch.empty(130, 70, dtype=torch.float16)
    seed = torch.zeros(1, dtype=torch.int64)
    kernel_module.linear_relu_dropout_launch(x, w16, b16, y, seed, -32768, 1.0, False)()
    want = torch.relu(x.half().double() @ w16.double().T + b16.double())
    check(relative_error(y.double(), want), _y_bound(x.half(), w16, b16, want, torch.float16),
          family_of(FAMILY, torch.float16), "triton y from converted features")


def test_compute_dtype_follows_cuda_autocast(monkeypatch):
    op = importlib.import_module("fastmil.ops.linear_relu_dropout")
    assert op.compute_dtype("cpu", torch.float32) == torch.float32
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
    assert op.compute_dtype("cuda", torch.float32) == torch.bfloat16
    assert op.compute_dtype("cpu", torch.float32) == torch.float32


def test_a_generator_on_another_device_is_refused():
    class CudaGenerator:
        device = torch.device("cuda")

    x, weight, bias = _case()
    with pytest.raises(ValueError, match="generator is on cuda"):
        linear_relu_dropout(x, weight, bias, 0.1, True, generator=CudaGenerator())


def _autocast_fp16(monkeypatch):
    """The Triton path as under CUDA autocast with fp16, on CPU tensors: fp32 features and parameters, fp16 compute."""
    op = importlib.import_module("fastmil.ops.linear_relu_dropout")
    monkeypatch.setattr(op, "_autocasting", lambda device_type: True)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.float16)
    return op


def _autocast_run(monkeypatch, n=150, chunk_rows=64):
    """fp32 post-ReLU features and fp32 parameters through the autocast (fp16) path in row chunks of ``chunk_rows``
    (a tail chunk): y (fp16), the fp32 leaves with their gradients, the upstream gradient as y's fp16 receives it."""
    op = _autocast_fp16(monkeypatch)
    monkeypatch.setattr(op, "CHUNK_ROWS", chunk_rows)
    x, weight, bias = _case(n=n, d=37, e=45)
    x = x.abs()
    y, leaves = _run(x, weight, bias, 0.25)
    assert y.dtype == torch.float16 and all(t.grad is None for t in leaves)
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y.double() * upstream).sum().backward()
    return y, leaves, upstream.half().double()


def test_autocast_weight_gradient_is_a_gemm_in_the_compute_dtype(monkeypatch):
    """Under autocast the weight gradient ``grad_pre^T x`` is a GEMM of compute-dtype operands with fp32 accumulation
    (on CUDA a half tensor-core GEMM with an fp32 output): the features enter it rounded to fp16, as the forward's
    kernel rounded them. Against the fp64 gradient of what the forward computed (x rounded to fp16; the upstream
    gradient as y's fp16 received it; the dropout/ReLU mask read off y) it is within the fp32 bound of the GEMM over
    the N rows; against the fp32 model's (unrounded x) within that plus the features' fp16 rounding, one unit of
    fp16 (2^-11) per term, independent: ``LAMBDA 2^-11`` times the terms' 2-norm. An fp32 GEMM of the unrounded
    features (the former code) is ~2^-12 off the first reference and fails it; so does a wrong gradient."""
    y, (x, weight, bias), upstream = _autocast_run(monkeypatch)
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    g = upstream * (y.double() > 0) / (1 - 0.25)  # the backward's grad_pre, in fp64 (scale 1 / (1 - p))
    x16 = x.detach().half().double()
    want = g.T @ x16
    bound = _bound(x.shape[0] + 2, g.abs().T @ x16.abs(), want)
    check(relative_error(weight.grad, want), bound, FAMILY, "autocast grad weight (rounded features)")
    model = g.T @ x.detach().double()
    rms = float(((g.square().T @ x.detach().double().square()).sqrt()).max()) / float(model.abs().max())
    rounding = LAMBDA * unit_roundoff(torch.float16) * rms
    check(relative_error(weight.grad, model), _bound(x.shape[0] + 2, g.abs().T @ x16.abs(), model) + rounding,
          FAMILY, "autocast grad weight (fp32 model)")
    check(relative_error(bias.grad, g.sum(0)), _bound(x.shape[0] + 2, g.abs().sum(0), g.sum(0)), FAMILY,
          "autocast grad bias")


def test_autocast_weight_gradient_on_cuda_is_one_half_gemm_with_an_fp32_output(monkeypatch):
    """The CUDA branch of the weight gradient, taken on the CPU (``HALF_GEMM_FP32_OUT``) with ``torch.addmm`` spied
    (the CPU has no fp16 GEMM with an fp32 output; the spy computes it from the exactly upcast operands): one call per
    row chunk, fp16 operands (``grad_pre^T`` and the features rounded to fp16), fp32 ``out`` = the gradient itself,
    ``beta`` 0 for the first chunk and 1 after; the gradient equals the CPU branch's bit for bit."""
    op = importlib.import_module("fastmil.ops.linear_relu_dropout")
    _, cpu_leaves, _ = _autocast_run(monkeypatch)
    calls = []
    real_addmm = torch.addmm

    def spy(acc, mat1, mat2, *, beta=1.0, alpha=1.0, out_dtype=None, out=None):
        assert out_dtype == torch.float32 and out is acc and out.dtype == torch.float32
        assert mat1.dtype == mat2.dtype == torch.float16
        calls.append((tuple(mat1.shape), tuple(mat2.shape), beta))
        return out.addmm_(mat1.float(), mat2.float(), beta=beta, alpha=alpha)

    monkeypatch.setattr(op, "HALF_GEMM_FP32_OUT", ("cpu",))
    monkeypatch.setattr(torch, "addmm", spy)
    try:
        _, cuda_leaves, _ = _autocast_run(monkeypatch)
    finally:
        monkeypatch.setattr(torch, "addmm", real_addmm)
    assert calls == [((45, 64), (64, 37), 0.0), ((45, 64), (64, 37), 1.0), ((45, 22), (22, 37), 1.0)]
    assert torch.equal(cuda_leaves[1].grad, cpu_leaves[1].grad)
    assert torch.equal(cuda_leaves[2].grad, cpu_leaves[2].grad)
