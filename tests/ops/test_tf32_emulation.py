"""The GPU precision of the kernels' fp32 ``tl.dot`` products, emulated on the CPU (the interpreter computes every dot
in fp32 and cannot show it): the accuracy contract of ``kernels/_launch.py: dot_precision``.

A tensor core multiplies TF32 numbers (10 mantissa bits): it reads an fp32 operand's top 19 bits, i.e. it truncates.
The products of two TF32 numbers are exact in fp32 and are accumulated in fp32. So a dot in each mode is emulated
exactly up to the accumulation order by rounding the operands as that mode does and multiplying in fp32:

- ``"tf32x3"`` (the default for every input dtype): ``a = hi + lo``, ``hi`` rounded to nearest TF32 (Triton's
  ``F32DotTC`` pass: ``cvt.rna.tf32.f32``), ``lo = a - hi`` truncated by the tensor core; ``lo*hi + hi*lo + hi*hi``.
  Also with ``hi`` truncated (a more pessimistic split): the contract must hold for it too.
- ``"tf32"`` (fp32 inputs under ``allow_tf32``): both operands rounded to nearest by ``kernels/_dot.py``.
- ``"tf32-truncated"``: a plain ``input_precision="tf32"`` on unrounded fp32 operands, what the kernels did before:
  its error must exceed the contract's bound (the choice of mode matters), and it is biased.

At realistic sizes (one bag of 4096 instances, D = 512, hidden 128; post-ReLU features, as a CNN encoder gives, and
the attention of an early model: scores ~ N(0, 1)), for the kernels' own tiles and splits: the pooling forward's
weighted sums ``p x`` (``pool_fwd_tile_kernel``), the pooling backward's ``x g^T`` and ``a g``
(``pool_bwd_tile_kernel``), and the gated backward's ``dpre [V; U]`` (``grad_h_kernel``) and ``dpre^T h``
(``weight_grad_kernel``) on the ``dpre`` of a real gated attention backward. Each result is compared with an fp64
evaluation of the same computation on the same (fp32) operands.

Bounds (tests/tolerance.py): the fp32 bound of the computation (as the interpreter tests hold it, the accumulation's
depth times ``dot_passes``: 3 for 3xTF32) plus ``dot_bound``: ``LAMBDA`` times the mode's per-product operand error
(``dot_product_roundoff``: 2^-21 per inexact operand for 3xTF32, 2^-11 rounded TF32) times the 2-norm of the terms.
A fp16/bf16 operand is exact in TF32. The same bounds are the GPU tolerances of the CUDA tests
(``tests/ops/test_attention_pool.py``).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import triton
import triton.language as tl

from fastmil.kernels._dot import dot_operand, fp32_dot
from fastmil.kernels._launch import compiled_dot_precision, dot_precision, interpreting
from fastmil.kernels.attention_pool import pool_config
from fastmil.kernels.gated_attention_pool import rows_per_split
from fastmil.ops import attention_pool, gated_attention_pool, linear_relu_dropout
from tests.ragged import relative_error
from tests.tolerance import (
    check,
    dot_bound,
    dot_passes,
    gemm_condition,
    half_rounding,
    pooled_condition,
    rounding_bound,
)

FAMILY = "tf32 emulation"
N, D, HIDDEN = 4096, 512, 128
HALF = (torch.float16, torch.bfloat16)
CASES = [(torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True)]
IDS = ["float16", "bfloat16", "float32", "float32-allow_tf32"]
CONTRACT = {(torch.float16, False): "tf32x3", (torch.bfloat16, False): "tf32x3", (torch.float32, False): "tf32x3",
            (torch.float32, True): "tf32"}
"""The documented mode per (input dtype, ``allow_tf32``): fp32-level unless fp32 inputs opted in to TF32."""


# ---- TF32 rounding of fp32 bit patterns ---------------------------------------------------------------------------

def truncate_tf32(x: torch.Tensor) -> torch.Tensor:
    """What a tensor core reads of an fp32 operand: the low 13 mantissa bits cleared (rounding towards zero)."""
    return (x.float().contiguous().view(torch.int32) & -8192).view(torch.float32)


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value, ties away from zero (``cvt.rna.tf32.f32``; ``kernels/_dot.py``'s bit trick)."""
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(torch.isnan(x), x.float(), ((bits + 0x1000) & -8192).view(torch.float32))


def emulated_dot(a: torch.Tensor, b: torch.Tensor, mode: str, split: str = "nearest") -> torch.Tensor:
    """``a @ b`` (batched or not) as a GPU ``tl.dot`` in ``mode`` computes it, in fp32 (``split``: how 3xTF32 forms
    ``hi``, ``"nearest"`` as Triton does or ``"truncate"``)."""
    a, b = a.float(), b.float()
    if mode == "ieee":
        return a @ b
    if mode == "tf32":
        return round_tf32(a) @ round_tf32(b)
    if mode == "tf32-truncated":
        return truncate_tf32(a) @ truncate_tf32(b)
    assert mode == "tf32x3", mode
    hi_of = round_tf32 if split == "nearest" else truncate_tf32
    a_hi, b_hi = hi_of(a), hi_of(b)
    a_lo, b_lo = truncate_tf32(a - a_hi), truncate_tf32(b - b_hi)
    acc = a_lo @ b_hi  # the order of Triton's F32DotTC: the small products first, into the same accumulator
    acc = acc + a_hi @ b_lo
    return acc + a_hi @ b_hi


def _inexact(dtype: torch.dtype, operand_is_input: bool) -> int:
    """1 if an operand is not exact in TF32 (an fp32 input, or an fp32 intermediate), 0 for a fp16/bf16 input."""
    return 0 if operand_is_input and dtype in HALF else 1


def _modes(dtype, allow_tf32):
    """The mode the kernels run for ``dtype`` inputs (the policy's), its 3xTF32 split variants, and the documented
    contract's mode, whose bound it must hold."""
    mode = compiled_dot_precision(dtype, allow_tf32)
    splits = ["nearest", "truncate"] if mode == "tf32x3" else ["nearest"]
    return mode, splits, CONTRACT[(dtype, allow_tf32)]


# ---- realistic data -----------------------------------------------------------------------------------------------

def _features(dtype, n=N, dim=D, seed=0):
    """Post-ReLU encoder features (non-negative, as a CNN's pooled activations), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g).abs().to(dtype)


def _scores(n=N, seed=1):
    """Attention scores of an early model: ~N(0, 1), so that many rows carry weight."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def emulated_pool_forward(scores, values, block_n, mode, split="nearest"):
    """``pool_fwd_tile_kernel`` + the merge, for one bag: per tile of ``block_n`` rows ``m = max s``,
    ``p = exp(s - m)``, ``l = sum p`` and ``partial = p . x`` (the dot in ``mode``), then the fp32 merge
    ``sum_t e^(m_t - M) partial_t / sum_t e^(m_t - M) l_t``."""
    s, x = scores.float(), values.float()
    n, dim = x.shape
    tiles = -(-n // block_n)
    pad = tiles * block_n - n
    s = torch.cat([s, torch.full((pad,), -math.inf)]).view(tiles, block_n)
    x = torch.cat([x, torch.zeros(pad, dim)]).view(tiles, block_n, dim)
    m = s.max(1).values
    p = torch.exp(s - m[:, None])
    partial = emulated_dot(p[:, None, :], x, mode, split)[:, 0]
    c = torch.exp(m - m.max())
    return (c[:, None] * partial).sum(0) / (c * p.sum(1)).sum()


def _gated_backward_operands(dtype, seed=2, n=N, dim=D, hidden=HIDDEN):
    """``h``, ``dpre [N, 2 HIDDEN]`` (fp32, as the tile kernel stores it), ``w2 = [V; U]`` (as ``grad_h_kernel``
    reads it: rounded to the input dtype for fp16/bf16, whose score GEMM used that) and the row weights ``a``, from
    an fp64 gated attention backward of one bag with a random upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    h = _features(dtype, n, dim, seed=seed)
    v = torch.randn(hidden, dim, generator=g) / dim**0.5
    u = torch.randn(hidden, dim, generator=g) / dim**0.5
    bv, bu = torch.randn(hidden, generator=g) * 0.1, torch.randn(hidden, generator=g) * 0.1
    w = torch.randn(hidden, generator=g) * 2
    if dtype in HALF:
        v, u = v.to(dtype).float(), u.to(dtype).float()
    grad_pooled = torch.randn(dim, generator=g, dtype=torch.float64)
    h64 = h.double()
    t = torch.tanh(h64 @ v.double().T + bv.double())
    sg = torch.sigmoid(h64 @ u.double().T + bu.double())
    a = torch.softmax((t * sg) @ w.double(), 0)
    ds = a * (h64 @ grad_pooled - grad_pooled @ (a @ h64))
    dz = ds[:, None] * w.double()
    dpre = torch.cat([dz * sg * (1 - t * t), dz * t * sg * (1 - sg)], 1).float()
    return h, dpre, torch.cat([v, u]).float(), a.float(), grad_pooled.float()


def _gemm_cases(dtype):
    """``name -> (a, b, inexact operands, splits)``: the backward dots of both pooling ops over one bag, with
    ``splits`` the kernel's row splits of the reduction (summed in order in fp32), None for one reduction."""
    h, dpre, w2, a, grad_pooled = _gated_backward_operands(dtype)
    both = 1 + _inexact(dtype, True)  # fp32 operand x the input: 2 for fp32 inputs, 1 for fp16/bf16
    return {
        # grad_h_kernel: dpre [N, 2H] @ [V; U] [2H, D]; w2 is exact for fp16/bf16 inputs (rounded to them)
        "grad_h_kernel dpre [V; U]": (dpre, w2, both, None),
        # weight_grad_kernel: dpre^T [2H, N] @ h [N, D] in rows_per_split(N) splits
        "weight_grad_kernel dpre^T h": (dpre.T, h, both, rows_per_split(N)),
        # pool_bwd_tile_kernel: u = x g^T over D, grad_values = a g (one head: K = 1, padded)
        "pool_bwd_tile_kernel x g^T": (h, grad_pooled[:, None], both, None),
        "pool_bwd_tile_kernel a g": (a[:, None], grad_pooled[None, :], 2, None),
    }


def _emulated_gemm(a, b, splits, mode, split="nearest"):
    if splits is None:
        return emulated_dot(a, b, mode, split)
    k = a.shape[1]
    acc = None
    for lo in range(0, k, splits):  # fixed order: split 0, 1, ... as the caller sums the partials
        part = emulated_dot(a[:, lo:lo + splits], b[lo:lo + splits], mode, split)
        acc = part if acc is None else acc + part
    return acc


# ---- tests --------------------------------------------------------------------------------------------------------

def test_tf32_rounding_helpers():
    """The emulation's bit tricks: truncation drops the low 13 bits; rounding goes to the nearest TF32 value with ties
    away from zero, carries into the exponent, keeps NaN, inf and zeros, and overflows past the largest TF32 value."""
    one_ulp = 2.0**-10
    x = torch.tensor([1.0, 1 + one_ulp / 2, 1 + one_ulp / 2 - 2**-23, -(1 + one_ulp / 2), 2 - 2**-23, 1 + one_ulp,
                      0.0, -0.0, math.inf, -math.inf, math.nan, 3.4028235e38])
    r = round_tf32(x)
    assert r[:8].tolist() == [1.0, 1 + one_ulp, 1.0, -(1 + one_ulp), 2.0, 1 + one_ulp, 0.0, -0.0]
    assert math.copysign(1.0, float(r[7])) == -1.0
    assert r[8] == math.inf and r[9] == -math.inf and math.isnan(r[10]) and r[11] == math.inf
    assert truncate_tf32(x)[:6].tolist() == [1.0, 1.0, 1.0, -1.0, 2 - one_ulp, 1 + one_ulp]
    y = torch.randn(10_000, dtype=torch.float64).float()
    assert float(((round_tf32(y) - y) / y).abs().max()) <= 2.0**-11
    assert float(((truncate_tf32(y) - y) / y).abs().max()) < 2.0**-10
    assert torch.equal(round_tf32(round_tf32(y)), round_tf32(y))
    assert torch.equal(truncate_tf32(round_tf32(y)), round_tf32(y))


def test_policy_picks_an_fp32_level_mode_unless_tf32_is_allowed_for_fp32_inputs():
    """Every fp32 ``tl.dot`` of fp16/bf16 inputs runs 3xTF32 (their softmax weights, ``dpre`` and gradients are not
    TF32 numbers); fp32 inputs too, unless the user allowed TF32 for fp32 GEMMs."""
    for (dtype, allow), mode in CONTRACT.items():
        assert compiled_dot_precision(dtype, allow) == mode
    for dtype in HALF:
        assert compiled_dot_precision(dtype, True) == "tf32x3"


@pytest.mark.parametrize(("dtype", "allow_tf32"), CASES, ids=IDS)
def test_pooling_forward_within_the_contract_and_truncated_tf32_outside_it(dtype, allow_tf32):
    """``pooled = sum_i p_i x_i / sum_i p_i`` with the tile kernel's tiles: within the fp32 bound of the interpreter
    tests (depth 2n + 2, the extra dots of 3xTF32 counted, times ``pooled_condition``) plus the mode's operand term.
    The weights ``p`` are fp32 (inexact); fp16/bf16 values are exact in TF32. Plain truncated TF32 exceeds the
    bound of the 3xTF32 contract (the audit's case: 6.3e-5 against 5e-5 for fp16 on the unit tests' bags)."""
    mode, splits, contract = _modes(dtype, allow_tf32)
    scores, values = _scores(), _features(dtype)
    weights = torch.softmax(scores.double(), 0)
    ref = weights @ values.double()
    offsets = torch.tensor([0, N])
    cond1 = pooled_condition(weights, values, offsets, ref[None])
    cond2 = pooled_condition(weights, values, offsets, ref[None], norm=2)
    inexact = 1 + _inexact(dtype, True)
    block_n = pool_config(1, dtype).block_n

    def bound(m):
        return rounding_bound(2 * N + 2 + (dot_passes(m) - 1) * N, condition=cond1) + dot_bound(m, inexact, cond2)

    def emulate(m, split="nearest"):
        return emulated_pool_forward(scores, values, block_n, m, split)

    truncated = _check_modes(emulate, ref, bound(contract), mode, splits, contract, "pooled")
    # truncation shrinks every product: the pooled vector (all positive here) comes out low on average
    bias = float(((truncated.double() - ref) / ref).mean())
    assert bias < -2.0**-12 * inexact, bias
    if contract == "tf32":  # rounding to nearest removes that bias
        rounded = emulated_pool_forward(scores, values, block_n, "tf32")
        assert abs(float(((rounded.double() - ref) / ref).mean())) < 2.0**-14


def _check_modes(emulate, ref: torch.Tensor, bound: float, mode: str, splits, contract: str, what: str
                 ) -> torch.Tensor:
    """``emulate(mode, split)`` within ``bound`` of ``ref`` for each split of ``mode``; under the 3xTF32 contract,
    plain truncated TF32 (``emulate("tf32-truncated")``, returned) must miss it by more than 3x."""
    for split in splits:
        check(relative_error(emulate(mode, split), ref), bound, FAMILY, f"{what} {mode} ({split} split)")
    truncated = emulate("tf32-truncated")
    error = relative_error(truncated, ref)
    if contract == "tf32x3":
        assert error > 3 * bound, f"truncated TF32: {error:.2e}, contract {bound:.2e}"
    return truncated


@pytest.mark.parametrize(("dtype", "allow_tf32"), CASES, ids=IDS)
@pytest.mark.parametrize("name", ["grad_h_kernel dpre [V; U]", "weight_grad_kernel dpre^T h",
                                  "pool_bwd_tile_kernel x g^T", "pool_bwd_tile_kernel a g"])
def test_backward_gemms_within_the_contract_and_truncated_tf32_outside_it(name, dtype, allow_tf32):
    """The backward dots with their fp32 operands (``dpre``, ``grad_pooled``, the weights; fp32 inputs and
    parameters): within the fp32 bound of a length-K reduction (K times ``dot_passes``, the splits' sum) relative to
    the largest result, with the terms' 2-norm as condition where it exceeds 1, plus the mode's operand term.
    Plain truncated TF32 is ~2^-11 off per inexact operand (the audit: 4-7e-4 on the parameter gradients)."""
    mode, splits, contract = _modes(dtype, allow_tf32)
    a, b, inexact, row_splits = _gemm_cases(dtype)[name]
    ref = a.double() @ b.double()
    k = a.shape[1]
    cond2 = gemm_condition(a, b, ref)
    n_splits = 1 if row_splits is None else -(-k // row_splits)

    def bound(m):
        return rounding_bound(dot_passes(m) * k + n_splits, condition=max(cond2, 1.0)) + dot_bound(m, inexact, cond2)

    def emulate(m, split="nearest"):
        return _emulated_gemm(a, b, row_splits, m, split)

    _check_modes(emulate, ref, bound(contract), mode, splits, contract, name)


# ---- the kernels' own rounding in the "tf32" mode, run through the interpreter --------------------------------------
# The interpreter computes a dot in fp32 whatever its mode, so with the mode forced to "tf32" it multiplies exactly the
# operands kernels/_dot.py hands the tensor core: what a GPU computes in that mode, up to the accumulation order.

@triton.jit
def _dot_operand_kernel(x_ptr, y_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, dot_operand(x, MODE), mask=offs < n)


@pytest.mark.parametrize("mode", ["tf32", "tf32x3", "ieee"])
def test_dot_operand_rounds_to_nearest_tf32_only_in_the_tf32_mode(mode):
    """Bit for bit: the nearest TF32 value (ties away from zero) in ``"tf32"``, the input otherwise; NaN payloads that
    the bit trick would carry into the sign bit stay NaN, infinities stay, the largest fp32 values overflow."""
    special = torch.tensor([0x7FFFF000, 0x7FFFFFFF, 0xFFFFF000 - 2**32, 0x7FC00000, 0x7F800000, 0x7F7FFFFF,
                            0x00000FFF, 0x00001000, 0x80001000 - 2**32, 0x3F801000, 0x3F800FFF], dtype=torch.int32)
    x = torch.cat([special.view(torch.float32), torch.randn(501, dtype=torch.float64).float() * 1e3])
    y = torch.empty_like(x)
    _dot_operand_kernel[(1,)](x, y, x.numel(), MODE=mode, BLOCK=1024)
    want = round_tf32(x) if mode == "tf32" else x
    same = (y.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(y) & torch.isnan(want))
    assert bool(same.all()), (x[~same], y[~same], want[~same])
    assert bool(torch.isnan(y[:4]).all())


@triton.jit
def _fp32_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, MODE: tl.constexpr):
    rows, ks, cols = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * N + cols[None, :])
    acc = fp32_dot(a, b, tl.full((M, N), 1.0, dtype=tl.float32), MODE)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc)


@pytest.mark.parametrize("mode", ["tf32x3", "tf32", "ieee"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float32)], ids=["fp32-fp16", "bf16-fp32", "fp32-fp32"])
def test_fp32_dot_computes_the_product_of_the_operands_its_mode_sees(dtypes, mode):
    """``fp32_dot`` through the interpreter (which multiplies in fp32 whatever ``input_precision`` says): ``1 + a @ b``
    within the fp32 bound of a length-2K sum for ``"tf32x3"`` (its two-product split for an exact fp16/bf16
    operand, ``lo*b + hi*b``, loses nothing but roundings; dropping ``lo`` would be ~2^-11 off) and ``"ieee"``; of
    the operands rounded to nearest TF32 for ``"tf32"``."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(16, 64, generator=g).to(dtypes[0])
    b = torch.randn(64, 32, generator=g).to(dtypes[1])
    c = torch.empty(16, 32)
    _fp32_dot_kernel[(1,)](a, b, c, M=16, K=64, N=32, MODE=mode)
    if mode == "tf32":
        a64, b64 = round_tf32(a.float()).double(), round_tf32(b.float()).double()
    else:
        a64, b64 = a.double(), b.double()
    want = 1 + a64 @ b64
    bound = rounding_bound(2 * 64 + 1, condition=gemm_condition(a64, b64, want, norm=1) + 1)
    check(relative_error(c, want), bound, FAMILY, f"fp32_dot {mode}")
    if mode == "tf32":
        assert relative_error(c, 1 + a.double() @ b.double()) > 10 * bound


def _force_mode(monkeypatch, module_name, mode):
    module = importlib.import_module(f"fastmil.kernels.{module_name}")
    monkeypatch.setattr(module, "dot_precision", lambda dtype: mode)


def test_attention_pool_kernels_round_their_operands_in_the_tf32_mode(monkeypatch):
    """fp32 values, TF32 forced: a bag of one pools ``round(x)`` (its weight is exactly 1), and the backward's
    ``grad_values = a g`` of one head is the single exact product ``round(a) round(g)``: bit for bit. In the
    default mode the same outputs are the unrounded values (so the test sees the difference)."""
    _force_mode(monkeypatch, "attention_pool", "tf32")
    g = torch.Generator().manual_seed(3)
    sizes = [1, 5, 40]
    offsets = torch.tensor([0, 1, 6, 46])
    scores = torch.randn(sum(sizes), generator=g).requires_grad_()
    values = torch.randn(sum(sizes), 48, generator=g).requires_grad_()
    pooled, weights = attention_pool(scores, values, offsets, backend="triton")
    assert torch.equal(pooled[0].detach(), round_tf32(values[0].detach())), "bag of one: not the rounded values"
    assert not torch.equal(pooled[0].detach(), values[0].detach()), "bag of one: the unrounded values"
    upstream = torch.randn(3, 48, generator=g)
    pooled.backward(upstream)
    rows_bag = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    want = round_tf32(weights.detach())[:, None] * round_tf32(upstream)[rows_bag]
    assert torch.equal(values.grad, want), "grad values: not the product of the rounded operands"
    assert not torch.equal(values.grad, weights.detach()[:, None] * upstream[rows_bag]), "grad values: unrounded"


def test_linear_relu_dropout_kernel_rounds_its_operands_in_the_tf32_mode(monkeypatch):
    """fp32 inputs, TF32 forced: ``y = relu(round(x) round(W)^T + b)`` within the fp32 bound of the GEMM over D,
    and off the unrounded product by far more than that bound."""
    _force_mode(monkeypatch, "linear_relu_dropout", "tf32")
    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(70, 37, generator=g), torch.randn(45, 37, generator=g) / 6
    bias = torch.randn(45, generator=g)
    y = linear_relu_dropout(x, weight, bias, 0.0, False, backend="triton")
    rounded = torch.relu(round_tf32(x).double() @ round_tf32(weight).double().T + bias.double())
    exact = torch.relu(x.double() @ weight.double().T + bias.double())
    cond = gemm_condition(x, weight.T, rounded, norm=1) + 1
    bound = rounding_bound(37 + 2, condition=cond)
    check(relative_error(y, rounded), bound, FAMILY, "linear_relu_dropout y (tf32 forced)")
    assert relative_error(y, exact) > 10 * bound


@pytest.mark.parametrize(("mode", "dtype"), [("tf32", torch.float32), ("tf32x3", torch.float32),
                                           ("tf32x3", torch.float16)])
def test_gated_kernels_run_in_every_mode(mode, dtype, monkeypatch):
    """The gated kernels with their mode forced (the fp32 score GEMM, ``grad_h``, the weight grads; for fp16 inputs
    ``fp32_dot``'s two-product split): they run, and every output stays within the TF32 rounding of the default
    mode's (a smoke test of the constexpr branches; the bounds of the GPU modes are the emulation's above)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(70, 40, generator=g).to(dtype)
    params = [torch.randn(24, 40, generator=g) / 6, torch.randn(24, generator=g) * 0.1,
              torch.randn(24, 40, generator=g) / 6, torch.randn(24, generator=g) * 0.1,
              torch.randn(1, 24, generator=g), torch.randn(1, generator=g)]
    offsets = torch.tensor([0, 30, 70])

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (h, *params)]
        pooled, weights = gated_attention_pool(leaves[0], *leaves[1:], offsets, backend="triton")
        (pooled.sum() + (weights * torch.arange(70.0)).sum()).backward()
        return [pooled.detach(), weights.detach()] + [t.grad for t in leaves]

    default = run()
    _force_mode(monkeypatch, "gated_attention_pool", mode)
    forced = run()
    for a, b in zip(forced[:-1], default[:-1]):  # not grad w_bias: exactly 0 (a shift of every score), rounding only
        assert torch.isfinite(a).all()
        assert relative_error(a, b) < 2.0**-6
    assert abs(float(forced[-1])) < 2.0**-6 * float(default[-2].abs().max())


@pytest.mark.parametrize("heads", [1, 20])
def test_attention_pool_kernels_run_in_the_split_mode(heads, monkeypatch):
    """fp16 values with 3xTF32 forced: ``fp32_dot`` splits only the weights (forward), ``grad_pooled`` (``x g^T``)
    and both operands of ``a g``; the interpreter multiplies the parts in fp32, so every output is the default
    mode's within fp32 roundings (far inside the ~2^-11 of a dropped ``lo``)."""
    g = torch.Generator().manual_seed(7)
    offsets = torch.tensor([0, 1, 50, 120])
    scores = torch.randn(120, heads, generator=g) * 2
    values = torch.randn(120, 40, generator=g).half()
    upstream = torch.randn(3, heads, 40, generator=g)

    def run():
        s, v = scores.clone().requires_grad_(), values.clone().requires_grad_()
        pooled, weights = attention_pool(s, v, offsets, backend="triton")
        pooled.backward(upstream)
        return pooled.detach(), s.grad, v.grad

    default = run()
    _force_mode(monkeypatch, "attention_pool", "tf32x3")
    forced = run()
    assert relative_error(forced[0], default[0]) < 2.0**-16 and relative_error(forced[1], default[1]) < 2.0**-16
    assert relative_error(forced[2], default[2]) <= 2.0**-10  # fp16 gradient: at most a flip of its last bit



# ---- the compiled kernels against the contract and their emulation (the GPU run; its plumbing on the CPU) ----------

def _check_kernels(device, dtype, mode, contract, n, dim, hidden):
    """The dots of ``pool_fwd_tile_kernel`` (through ``attention_pool``, one bag), ``weight_grad_kernel`` and
    ``grad_h_kernel`` (launched on a gated backward's ``dpre``) on ``device``: against fp64 within the bound of the
    ``contract`` mode, and against the CPU emulation of ``mode`` within twice the fp32 accumulation bound (the same
    exact products, summed in two orders), so that the tensor cores are seen doing what the emulation models (a
    truncating tensor core or a lost ``lo`` would be ~2^-11 away from it)."""
    from fastmil.kernels.gated_attention_pool import gated_config, grad_h_launch, weight_grad_launch

    inexact = 1 + _inexact(dtype, True)
    # pooling forward
    scores, values = _scores(n), _features(dtype, n, dim)
    offsets = torch.tensor([0, n])
    pooled, _ = attention_pool(scores.to(device), values.to(device), offsets.to(device), backend="triton")
    pooled = pooled.cpu()[0]
    weights = torch.softmax(scores.double(), 0)
    ref = weights @ values.double()
    cond1 = pooled_condition(weights, values, offsets, ref[None])
    cond2 = pooled_condition(weights, values, offsets, ref[None], norm=2)
    accumulation = rounding_bound(2 * n + 2 + (dot_passes(mode) - 1) * n, condition=cond1)
    check(relative_error(pooled, ref), accumulation + dot_bound(contract, inexact, cond2), FAMILY,
          f"{device} pooled ({mode})")
    emulated = emulated_pool_forward(scores, values, pool_config(1, dtype).block_n, mode)
    check(relative_error(pooled, emulated.double()), 2 * accumulation, FAMILY, f"{device} pooled vs emulation")
    # the gated backward's GEMMs
    h, dpre, w2, a, grad_pooled = _gated_backward_operands(dtype, n=n, dim=dim, hidden=hidden)
    hid_pad = dpre.shape[1] // 2
    assert hid_pad == hidden  # a power of two: no padding to add
    split = rows_per_split(n)
    partial = torch.zeros(-(-n // split), 2 * hid_pad, dim, device=device)
    weight_grad_launch(dpre.to(device), h.to(device), partial)()
    got = partial.sum(0).cpu()
    ref = dpre.double().T @ h.double()
    cond2 = gemm_condition(dpre.T, h, ref)
    accumulation = rounding_bound(dot_passes(mode) * n + partial.shape[0], condition=max(cond2, 1.0))
    check(relative_error(got, ref), accumulation + dot_bound(contract, inexact, cond2), FAMILY,
          f"{device} weight_grad_kernel ({mode})")
    emulated = _emulated_gemm(dpre.T, h, split, mode)
    check(relative_error(got, emulated.double()), 2 * accumulation, FAMILY, f"{device} weight_grad vs emulation")
    block_n = gated_config(hid_pad, dtype).block_n
    tile_start = torch.arange(0, n, block_n)
    tile_end = torch.clamp(tile_start + block_n, max=n)
    tile_bag = torch.zeros(tile_start.numel(), dtype=torch.int32)
    grad_h = torch.empty(n, dim, dtype=dtype, device=device)
    grad_h_launch(dpre.to(device), w2.to(device), a.to(device), grad_pooled[None].to(device), tile_bag.to(device),
                  tile_start.to(device), tile_end.to(device), grad_h)()
    ref = a.double()[:, None] * grad_pooled.double()[None] + dpre.double() @ w2.double()
    cond2 = gemm_condition(dpre, w2, ref)
    accumulation = rounding_bound(dot_passes(mode) * 2 * hid_pad + 2, condition=max(cond2, 1.0))
    stored = half_rounding(dtype)
    check(relative_error(grad_h.cpu(), ref), accumulation + dot_bound(contract, inexact, cond2) + stored, FAMILY,
          f"{device} grad_h_kernel ({mode})")
    emulated = (a[:, None] * grad_pooled[None] + emulated_dot(dpre, w2, mode)).to(dtype)
    check(relative_error(grad_h.cpu(), emulated.double()), 2 * (accumulation + stored), FAMILY,
          f"{device} grad_h vs emulation")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_check_runs_through_the_interpreter(dtype):
    """The GPU check below, small and through the interpreter (mode ``"ieee"``): its launches and references."""
    mode = dot_precision(dtype)
    assert mode == "ieee"
    _check_kernels("cpu", dtype, mode, mode, n=300, dim=48, hidden=32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                    reason="needs a CUDA GPU and compiled kernels (the interpreter computes dots in fp32)")
@pytest.mark.parametrize(("dtype", "allow_tf32"), CASES, ids=IDS)
def test_gpu_dots_hold_the_contract_and_match_their_emulation(dtype, allow_tf32, monkeypatch):
    """The per-dot precision check of a GPU run: the compiled kernels' dots at the emulation's sizes, in the mode
    the policy picks, within the contract's bound and at the emulated values (``_check_kernels``)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    mode, _, contract = _modes(dtype, allow_tf32)
    assert dot_precision(dtype) == mode
    _check_kernels("cuda", dtype, mode, contract, n=N, dim=D, hidden=HIDDEN)
