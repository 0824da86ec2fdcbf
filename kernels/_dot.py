"""The kernels' fp32 ``tl.dot`` products, in the mode of the precision contract (``_launch.dot_precision``).

- ``fp32_dot(a, b, acc, DOT_PRECISION)``: ``acc + a @ b`` in fp32 for operands of any float dtype (fp16/bf16 operands
  are converted here, exactly). Every weighted sum and gradient GEMM whose operands are not all fp16/bf16 goes
  through it (the native half-precision score and embed GEMMs do not: their products are exact).
- ``dot_operand(x, DOT_PRECISION)``: ``x`` as the tensor core should see it (for the fp32 score and embed GEMMs).

``"tf32x3"`` (the default for every input dtype): an fp32 operand ``a`` is split into ``hi``, its TF32 value rounded
to nearest, and ``lo = a - hi`` (exact, truncated to TF32 by the tensor core), and ``lo*hi + hi*lo + hi*hi`` runs
on tensor cores: per product ``2^-21`` relative per inexact operand. When one operand is an fp16/bf16 value (exact
in TF32), only the other is split and two TF32 products remain, ``lo*b + hi*b``: the same result as Triton's 3xTF32
(whose third product would multiply the zero ``lo`` of the exact operand), a third less tensor-core work and no
registers for a split of the exact operand. Two fp32 operands use Triton's ``input_precision="tf32x3"``.

``"tf32"`` (fp32 inputs under ``torch.backends.cuda.matmul.allow_tf32``): both operands are rounded to the nearest
TF32 value (10 mantissa bits, ties away from zero, like ``cvt.rna.tf32.f32``) with integer operations on the bit
pattern, so that the tensor core, which reads only the top 19 bits of an fp32 operand (it truncates), gets values
that are already TF32. Truncation would bias every product towards zero by ~``2^-11`` per operand; rounding to
nearest errs by at most ``2^-11`` either way, without bias.

``"ieee"`` (the interpreter, which computes every dot in fp32 whatever the mode): a plain fp32 dot.

The bit trick runs in the interpreter too (tests force the modes there), where inline PTX would not. NaN stays NaN
(adding ``0x1000`` to some NaN payloads would carry into the sign bit); infinities, and values that round past the
largest TF32 value, become infinite, as ``cvt.rna`` does.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot_operand", "fp32_dot", "round_tf32"]


@triton.jit
def round_tf32(x):
    """fp32 ``x`` rounded to the nearest TF32 value (ties away from zero); NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = 0xFFFFE000: 13 low bits cleared
    return tl.where(x == x, rounded, x)


@triton.jit
def dot_operand(x, DOT_PRECISION: tl.constexpr):
    """``x`` (fp32) as the ``tl.dot`` of mode ``DOT_PRECISION`` should see it: rounded to nearest TF32 for
    ``"tf32"``, unchanged otherwise (``"tf32x3"`` splits its operands itself, ``"ieee"`` uses fp32)."""
    if DOT_PRECISION == "tf32":
        x = round_tf32(x)
    return x


@triton.jit
def fp32_dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` (fp32 ``acc``) with ``a``, ``b`` of any float dtype, in the mode ``DOT_PRECISION`` (see the
    module docstring: with ``"tf32x3"``, an fp16/bf16 operand is exact and only the other one is split)."""
    a_exact: tl.constexpr = a.dtype != tl.float32
    b_exact: tl.constexpr = b.dtype != tl.float32
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    if DOT_PRECISION == "tf32x3" and a_exact != b_exact:
        if a_exact:
            b_hi = round_tf32(b)
            acc = tl.dot(a, b - b_hi, acc, input_precision="tf32")
            acc = tl.dot(a, b_hi, acc, input_precision="tf32")
        else:
            a_hi = round_tf32(a)
            acc = tl.dot(a - a_hi, b, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(dot_operand(a, DOT_PRECISION), dot_operand(b, DOT_PRECISION), acc,
                     input_precision=DOT_PRECISION)
    return acc
