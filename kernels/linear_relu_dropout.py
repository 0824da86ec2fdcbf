"""Triton kernel of the MIL embed block's forward on a GPU: ``y = dropout(relu(x W^T + b))`` as one GEMM whose
epilogue adds the bias, applies the ReLU and the dropout and stores ``y`` once (``fastmil.ops.linear_relu_dropout``;
on the CPU the op runs its torch path).

- ``linear_relu_dropout_kernel``: one program per ``[BLOCK_M, BLOCK_N]`` tile of ``y`` (programs of one row block
  are adjacent, so they share its rows of ``x`` in L2); a K loop over D in ``BLOCK_K`` steps with ``tl.dot``
  (fp32 accumulation); then ``+ b``, ReLU, the keep mask and the scale ``1 / (1 - p)`` in registers, and one store
  in ``y``'s dtype. No ``N x E`` temporary exists beside ``y``, and no mask is stored: the backward reads ``y``
  (``y > 0`` exactly where an entry was kept and its pre-activation positive), as on the CPU.

Random bits: Philox (``tl.randint``) of ``(seed, row * E + col)``, the entry's global index, so the mask depends on
the seed and the entry only, not on block sizes or the launch. An entry is kept when the low 16 bits of its draw,
taken as a uniform value in [-32768, 32767], are at least ``threshold`` (``-32768 + round(p 65536)``, the torch
path's rule: the same ``p`` resolution and scale; the bits themselves differ from the CPU path's). ``seed`` is
read from a device tensor: no host synchronisation, no value-dependent specialisation.

Cost of the draws: one 10-round Philox per entry, of whose 128 bits 16 are used (~3 G integer operations at
100k x 512, of the order of 0.05 ms on an H100; spreading one draw over 8 adjacent columns would cut that 8-fold).

Precision: every load that enters arithmetic outside ``tl.dot`` is cast to fp32. ``UPCAST`` (``_launch.upcast_dots``)
casts the ``tl.dot`` operands to fp32 for fp32 inputs (with ``DOT_PRECISION``: 3xTF32, fp32-level, or, under
``allow_tf32``, where torch's own fp32 GEMMs run TF32 too, TF32 with operands rounded to nearest by
``_dot.dot_operand``) and for bf16 under the interpreter (whose bf16 arithmetic is wrong); otherwise fp16/bf16
operands go to ``tl.dot`` natively, with fp32 accumulation, as cuBLAS does under autocast (``x`` of another dtype
is converted to W's in registers).
``x`` is addressed with its own row stride. NaN propagates as in torch (through the ReLU and the dropout).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._dot import dot_operand
from ._launch import AOT_DIMS, KernelConfig, Launch, aot_views, dot_precision, upcast_dots

__all__ = ["aot_launches", "linear_relu_dropout_config", "linear_relu_dropout_kernel", "linear_relu_dropout_launch"]

AOT_OUT_DIMS = (128, 256, 512, 1024, 40, 1)
"""Embedding widths ``E`` the AOT checks feed the launcher: each class Triton specialises the runtime ``E`` into
(divisible by 16, not, and ``E = 1``, a constant: a layer of one output unit)."""


COMPUTE_DTYPES = (
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16),
)
"""``(x dtype, compute dtype)`` pairs the op launches: one dtype throughout, or, under CUDA autocast, features of
any float dtype with the weights in the autocast dtype."""


def linear_relu_dropout_config(dtype: torch.dtype) -> KernelConfig:
    """Tile config: ``block_n`` rows of ``y`` (BLOCK_M), ``block_d`` columns (BLOCK_N); BLOCK_K is
    :func:`block_k`. fp32 inputs run 3xTF32 products and take smaller tiles (the sizes where ``make aot`` shows no
    register spills on sm_80 and sm_90)."""
    if dtype == torch.float32:
        return KernelConfig(block_n=64, block_d=64, num_warps=8, num_stages=3)
    return KernelConfig(block_n=128, block_d=64, num_warps=8, num_stages=3)


def block_k(dtype: torch.dtype) -> int:
    """K step of the GEMM loop over D (fp32: 16, whose 3xTF32 operand tiles leave registers for the epilogue's
    Philox rounds)."""
    return 16 if dtype == torch.float32 else 32


@triton.jit(do_not_specialize=["N", "threshold"])  # any row count and any p: one specialisation each
def linear_relu_dropout_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, seed_ptr,
    N, D, E, stride_x, threshold, scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n_col_blocks = tl.cdiv(E, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // n_col_blocks  # adjacent programs share a row block of x
    pid_n = pid % n_col_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < E
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    w_cols = w_ptr + cols[None, :].to(tl.int64) * D  # W is [E, D]: the tile of W^T is [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = dot_operand(a.to(tl.float32), DOT_PRECISION)
            b = dot_operand(b.to(tl.float32), DOT_PRECISION)
        else:
            a = a.to(b.dtype)  # x in another dtype than W (autocast): converted in registers, not copied
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch
    if DROPOUT:
        entry = rows[:, None].to(tl.int64) * E + cols[None, :]
        bits = tl.randint(tl.load(seed_ptr), entry)
        draw = (bits & 0xFFFF).to(tl.int32) - 32768  # uniform in [-32768, 32767]
        acc = acc * tl.where(draw >= threshold, scale, 0.0)  # a dropped NaN stays NaN too (NaN * 0)
    y_tile = y_ptr + rows[:, None].to(tl.int64) * E + cols[None, :]
    tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def linear_relu_dropout_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, seed: torch.Tensor,
    threshold: int, scale: float, dropout: bool,
) -> Launch:
    """``x [N, D]`` (own row stride, any float dtype: converted in registers), ``weight [E, D]`` and ``bias [E]`` or
    None in the compute dtype; ``seed`` int64 ``[1]``; ``threshold`` the int16 drop threshold and ``scale``
    ``1 / (1 - p)`` (used when ``dropout``) -> ``y [N, E]`` in the compute dtype."""
    n, dim = x.shape
    out_dim = weight.shape[0]
    cfg = linear_relu_dropout_config(weight.dtype)
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(out_dim, cfg.block_d),)
    return Launch(
        linear_relu_dropout_kernel, grid,
        dict(x_ptr=x, w_ptr=weight, b_ptr=weight if bias is None else bias, y_ptr=y, seed_ptr=seed, N=n, D=dim,
             E=out_dim, stride_x=x.stride(0), threshold=threshold, scale=scale, HAS_BIAS=bias is not None,
             DROPOUT=dropout, UPCAST=upcast_dots(weight.dtype), DOT_PRECISION=dot_precision(weight.dtype),
             BLOCK_M=cfg.block_n, BLOCK_N=cfg.block_d, BLOCK_K=block_k(weight.dtype)),
        cfg.num_warps, cfg.num_stages, strided=("x_ptr",),
    )


def aot_launches() -> Iterator[Launch]:
    """Every launch over representative arguments: input and compute dtypes (``COMPUTE_DTYPES``), feature widths D
    and embedding widths E (each divisibility class), the canonical row layouts of ``x``, with and without bias,
    training and inference."""
    n = 64
    seed = torch.zeros(1, dtype=torch.int64)
    for x_dtype, dt in COMPUTE_DTYPES:
        for dim in AOT_DIMS:
            for x in aot_views(n, dim, x_dtype):
                for out_dim in AOT_OUT_DIMS:
                    weight = torch.zeros(out_dim, dim, dtype=dt)
                    y = torch.zeros(n, out_dim, dtype=dt)
                    for bias in (None, torch.zeros(out_dim, dtype=dt)):
                        for dropout in (False, True):
                            yield linear_relu_dropout_launch(x, weight, bias, y, seed, -16384, 4.0 / 3.0, dropout)
