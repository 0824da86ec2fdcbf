"""The tolerance policy of fastmil's numeric tests: bounds derived from the computation, not from one CPU's error.

Why: the error of an fp32 result against its fp64 reference depends on the order of its roundings, which the BLAS
and ATen pick by CPU vendor, ISA (``MKL_CBWR``, ``ATEN_CPU_CAPABILITY``) and thread count. A tolerance set at "the
error measured here, plus a little" fails on the next machine (it did: 2.46e-6 against a bound of 2e-6 on an AMD
CPU). So every comparison of a computed value with a reference states a bound of this form:

    bound = LAMBDA * u * (sqrt(depth) * condition + extra)

- ``u`` is the unit roundoff of the dtype the computation runs in (``unit_roundoff``): 2^-24 for fp32, 2^-53 for
  fp64. The output's own rounding to fp16/bf16 is one more ``u`` of that dtype (``output_rounding``).
- ``depth`` is the number of roundings on the longest chain into one output: the lengths of the reductions it
  passes through (a GEMM over K, a softmax over a bag of n rows, a pooled sum over n rows) plus its elementwise
  steps. Each test states its ``depth`` from its own shapes (the K of that test), so a larger bag gets a larger
  bound and a smaller one a tighter bound.
- ``sqrt(depth)`` is the probabilistic bound of a length-K reduction (Higham & Mary, SIAM J. Sci. Comput. 2019:
  ``|error| <= lambda sqrt(K) u`` relative to the sum of the terms' magnitudes, for independent roundings). It
  holds whatever blocking order the library chose; the deterministic worst case ``K u`` is reached only by
  correlated rounding and would hide real bugs at the K of these tests (fp16 rounding of a weight is ~2^-12
  relative).
- ``condition`` scales the error to the metric's normaliser where the two differ: the magnitude of the terms
  that cancel (a softmax gradient ``a_i (u_i - c)``), the size of a score whose absolute error becomes a relative
  error of its weight, and so on. Each use names what it stands for.
- ``extra`` adds terms that do not grow with ``depth``, such as ``|ln w|`` of a softmax weight, whose ``exp``
  turns the absolute rounding of ``s - lse`` into a relative error of ``w``.
- ``LAMBDA`` = 4 is the one constant of the policy. Why 4: a reduction's error is a sum of independent roundings
  with standard deviation ``~u sqrt(K) / sqrt(3)``, and the largest of the ~10^5 errors a test file compares lies
  ~4.5 standard deviations out, ``~2.6 u sqrt(K)``; 4 leaves room for partly correlated roundings. It is checked
  on every code path below (the largest error-to-bound ratio per op family is printed at the end of every run),
  and the mutants of tests/mutants.py show it keeps the tests sharp: a value rounded to fp16 on the way (a real
  bug) is off by ~1e-4 relative, well above the fp32 bounds of these tests (~1e-5 to ~8e-5 with their conditions).

Code paths the suite must pass on (``tests/README.md``): ``MKL_CBWR=COMPATIBLE|AVX2|AVX512``,
``ATEN_CPU_CAPABILITY=default|avx2``, ``FASTMIL_TORCH_THREADS=1|2`` and, for the Triton interpreter's ``tl.dot``
(numpy's OpenBLAS), ``OPENBLAS_CORETYPE``; ``.ci/run`` repeats the numeric tests under ``MKL_CBWR=COMPATIBLE
ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=Sandybridge`` with one thread.

Correlated roundings (a sum of equal terms, which rounds the same way at every step) take the deterministic
``worst_case_bound`` (``K u / (1 - K u)``) instead.

Comparisons that need no bound: bitwise equality where both sides run the same kernels in the same order (resume,
cached vs uncached, a view vs a copy of the same values through the same path), and exact integers.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import torch

from tests.ragged import per_bag_error

LAMBDA = 4.0
"""The policy's one constant (see the module docstring)."""

_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}

RATIOS: dict[str, float] = defaultdict(float)
"""Largest error-to-bound ratio seen this session, per op family (printed by conftest.py at the end of a run)."""
WORST: dict[str, str] = {}
"""Per family, the test and the compared quantity that gave its largest ratio."""
DETAIL: dict[str, float] = defaultdict(float)
"""Largest ratio per ``family: quantity`` (written to ``$FASTMIL_TOLERANCE_REPORT`` with the per-family table)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the distance from 1 to the next number of ``dtype`` (round to nearest)."""
    return _UNIT_ROUNDOFF[dtype]


def rounding_bound(depth: int, dtype: torch.dtype = torch.float32, condition: float = 1.0, extra: float = 0.0) -> float:
    """``LAMBDA * u * (sqrt(depth) * condition + extra)``: the relative error allowed to a result of ``depth``
    roundings in ``dtype`` (see the module docstring for each term)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return LAMBDA * unit_roundoff(dtype) * (math.sqrt(depth) * condition + extra)


def worst_case_bound(depth: int, dtype: torch.dtype = torch.float32) -> float:
    """``depth * u / (1 - depth * u)``: the deterministic bound of a length-``depth`` sum relative to the sum of its
    terms' magnitudes (Higham's gamma_K), for roundings that are correlated rather than independent (a sum of equal
    terms rounds the same way at every step), where the ``sqrt(depth)`` model does not apply."""
    u = unit_roundoff(dtype)
    if depth * u >= 1:
        raise ValueError(f"depth {depth} is too large for a bound in {dtype}")
    return depth * u / (1 - depth * u)


def output_rounding(dtype: torch.dtype) -> float:
    """The error of storing an fp32 result in ``dtype``: one unit in the last place (the Triton interpreter
    truncates fp32 -> bf16 instead of rounding to nearest, so a full ulp = 2u rather than u)."""
    return 2.0 * unit_roundoff(dtype)


def half_rounding(dtype: torch.dtype) -> float:
    """``output_rounding(dtype)`` for fp16/bf16 outputs, 0 for the dtypes the computation itself runs in."""
    return 0.0 if dtype in (torch.float32, torch.float64) else output_rounding(dtype)


def family_of(family: str, dtype: torch.dtype) -> str:
    """``family``, or ``"family (bfloat16 output)"`` for a half-precision output: its bound is one rounding of the
    output, which a result can come close to by construction, so its ratios are reported apart."""
    return family if dtype in (torch.float32, torch.float64) else f"{family} ({str(dtype)[6:]} output)"


def lse_bound(n: int, score_max: float, dtype: torch.dtype = torch.float32, extra: float = 0.0) -> float:
    """Absolute bound of a bag's log-sum-exp ``m + log(sum exp(s - m))``: the sum's ``n`` roundings (relative, so
    absolute in its log), and the roundings of ``s - m`` and of ``m + log(...)`` at the scores' size ``score_max``;
    ``extra``: the scores' own error where they are computed."""
    return rounding_bound(max(n, 1), dtype, extra=2 * score_max + 2 + extra)


def check(error: float, bound: float, family: str, what: str = "") -> None:
    """Assert ``error <= bound`` and record the ratio under ``family`` (an op or model family, e.g.
    ``"attention_pool"``) for the end-of-run report."""
    ratio = error / bound if bound > 0 else (0.0 if error == 0 else math.inf)
    if not math.isnan(ratio) and ratio >= RATIOS[family]:
        RATIOS[family] = ratio
        WORST[family] = f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]} {what}"
    label = f"{family}{': ' + what if what else ''}"
    if not math.isnan(ratio):
        DETAIL[label] = max(DETAIL[label], ratio)
    assert error <= bound, f"{label}: error {error:.3e} > bound {bound:.3e} (ratio {ratio:.2f})"


def check_close(actual: torch.Tensor, expected: torch.Tensor, bound: float, family: str, what: str = "",
                scale: float | None = None) -> None:
    """``check`` of the largest absolute difference, relative to ``scale`` (default: the largest reference
    magnitude, at least 1e-300). Shapes must match; NaN anywhere fails."""
    assert actual.shape == expected.shape, f"{family} {what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return
    finite = torch.isfinite(e)
    assert torch.equal(a[~finite], e[~finite]), f"{family} {what}: non-finite values differ"
    diff = float((a[finite] - e[finite]).abs().max()) if finite.any() else 0.0
    denom = float(e[finite].abs().max()) if scale is None and finite.any() else (scale or 0.0)
    check(diff / max(denom, 1e-300) if denom else diff, bound, family, what)


# ---- bounds of the building blocks several ops share -------------------------------------------------------------


def softmax_weight_ratio(weights: torch.Tensor, expected: torch.Tensor, offsets: torch.Tensor,
                         score_scale: float = 0.0, score_depth: int = 1, floor: float = 1e-30,
                         dtype: torch.dtype = torch.float32, score_max: float | torch.Tensor = 0.0) -> float:
    """Largest ratio of a softmax weight's relative error to its bound, over all weights ``[N]`` or ``[N, H]``.

    A weight ``w_i = exp(s_i - lse_b)`` is off by the absolute errors of ``s_i`` and of ``lse_b`` (turned into a
    relative error by ``exp``), plus its own roundings. ``lse_b`` sums ``n_b`` terms (depth ``n_b``); computing
    ``s_i - lse_b`` rounds at ``|ln w_i|``; forming ``lse_b = m + log l`` rounds at ``|lse_b| <= score_max + ln
    n_b`` (``score_max``: the largest ``|s|``); a computed score (``score_scale`` > 0: the magnitude of the terms a
    score sums, ``score_depth`` of them) carries ``sqrt(score_depth) * score_scale``, once in ``s_i`` and once in
    ``lse_b``. So per weight: ``LAMBDA u (sqrt(n_b) + |ln w_i| + score_max + ln n_b + 1 + 2 sqrt(score_depth)
    score_scale)``, relative to ``max(w_i, floor)`` (a weight below ``floor`` underflows: an absolute error is
    enough). A weight the reference gives 0 (masked) must be exactly 0. ``dtype``: the one the softmax computes
    in. ``score_max`` may be per bag (``[B]``, or ``[B, H]`` for ``[N, H]`` weights; e.g. the reference's
    ``|lse|``, with the ``ln n_b`` term then counted twice)."""
    w, e = weights.detach().double(), expected.detach().double()
    assert w.shape == e.shape
    if bool(((e == 0) & (w != 0)).any()):
        return math.inf
    sizes = (offsets[1:] - offsets[:-1]).to(torch.float64)
    n = torch.repeat_interleave(sizes, offsets[1:] - offsets[:-1])
    if e.dim() == 2:
        n = n[:, None]
    log_w = torch.log(e.clamp_min(floor)).abs()
    if isinstance(score_max, torch.Tensor):  # per bag: onto its rows
        score_max = torch.repeat_interleave(score_max.detach().double(), offsets[1:] - offsets[:-1], dim=0)
    bound = LAMBDA * unit_roundoff(dtype) * (
        n.clamp_min(1).sqrt() + log_w + score_max + n.clamp_min(1).log() + 1 + 2 * math.sqrt(score_depth) * score_scale)
    ratio = (w - e).abs() / (e.clamp_min(floor) * bound)
    return float(ratio.max()) if ratio.numel() else 0.0


def pooled_condition(expected_weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                     expected_pooled: torch.Tensor, norm: int = 1) -> float:
    """``max_b,d sum_i w_i |v_id| / max |pooled|``: how much larger the terms of a weighted sum ``pooled[b] =
    sum_i w_i v_i`` are than the largest pooled value (the normaliser of ``relative_error``), at least 1. Weights
    ``[N]`` or ``[N, H]``, values ``[N, D]``, pooled ``[B, D]`` or ``[B, H, D]``. ``norm=2``: the 2-norm of the
    terms instead, ``max_b,d sqrt(sum_i (w_i v_id)^2) / max |pooled|`` (not floored): the size of a sum of one
    independent relative error per term, such as a GPU dot's operand rounding (``dot_bound``)."""
    w = expected_weights.detach().double()
    w = w[:, None] if w.dim() == 1 else w
    v = values.detach().double().abs()
    terms = 0.0
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            if norm == 1:
                terms = max(terms, float((w[lo:hi].T @ v[lo:hi]).max()))
            else:
                terms = max(terms, float((w[lo:hi].T.square() @ v[lo:hi].square()).max().sqrt()))
    top = float(expected_pooled.detach().double().abs().max()) if expected_pooled.numel() else 0.0
    if norm != 1:
        return terms / top if top > 0 else 1.0
    return max(terms / top, 1.0) if top > 0 else 1.0


def check_per_bag(actual: torch.Tensor, expected: torch.Tensor, offsets: torch.Tensor, bound: float, family: str,
                  what: str = "") -> None:
    """``check`` of the largest error of any bag's rows relative to that bag's own largest reference value (so the
    ~1/n weights of a large bag are held as tightly as the weight 1 of a bag of one)."""
    assert actual.shape == expected.shape, f"{family} {what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    check(per_bag_error(actual, expected, offsets), bound, family, what)


def max_bag(offsets: torch.Tensor) -> int:
    """The largest bag's row count (at least 1): the ``n`` of a per-bag reduction's depth."""
    return max(int((offsets[1:] - offsets[:-1]).max()), 1) if offsets.numel() > 1 else 1


# ---- GPU dot products (kernels/_launch.py dot_precision: the modes and their contract) ---------------------------


def dot_product_roundoff(mode: str, inexact: int) -> float:
    """Largest relative error of one product ``a * b`` of a GPU ``tl.dot`` in ``mode`` due to the representation of
    its operands, ``inexact`` (0, 1 or 2) of which are fp32 values that are not TF32 numbers (an fp16/bf16 value
    upcast to fp32 is exact in TF32). Products of TF32 numbers are exact in fp32; what the accumulation adds is the
    fp32 ``u`` of ``rounding_bound``.

    - ``"ieee"`` (and the interpreter): 0.
    - ``"tf32x3"``: ``a = hi + lo``, ``hi`` rounded to nearest TF32 (so ``|lo| <= 2^-11 |a|``), ``lo`` truncated to
      TF32 by the tensor core (off by ``< 2^-10 |lo|``): ``2^-21`` per inexact operand, plus ``2^-22`` for the
      dropped ``lo_a * lo_b`` when both are.
    - ``"tf32"`` with operands rounded to nearest (``kernels/_dot.py``): ``2^-11`` per inexact operand (plus the
      second-order ``2^-22``).
    - ``"tf32-truncated"``: what a plain ``input_precision="tf32"`` does to unrounded fp32 operands (the tensor core
      drops their low 13 bits): ``2^-10`` per inexact operand, all of one sign. Not a mode of the kernels: the
      emulation tests show it breaks the contract."""
    if mode == "ieee" or inexact == 0:
        return 0.0
    per_operand, both = {"tf32x3": (2.0**-21, 2.0**-22), "tf32": (2.0**-11, 2.0**-22),
                         "tf32-truncated": (2.0**-10, 2.0**-20)}[mode]
    return inexact * per_operand + (both if inexact == 2 else 0.0)


def dot_passes(mode: str) -> int:
    """How many products a GPU ``tl.dot`` in ``mode`` adds into its fp32 accumulator per product of the
    mathematical dot: 3 for ``"tf32x3"`` (``lo*hi``, ``hi*lo``, ``hi*hi``), so its accumulation has three times the
    depth; 1 otherwise."""
    return 3 if mode == "tf32x3" else 1


def dot_bound(mode: str, inexact: int, condition: float) -> float:
    """The operands' share of a GPU dot's error: ``LAMBDA * dot_product_roundoff(mode, inexact) * condition``, added
    to the fp32 bound of the computation (whose depth counts ``dot_passes(mode)`` additions per product). Each
    product errs independently (a round-to-nearest split or rounding: no common sign), so the errors of a sum add
    like its terms' 2-norm, not their sum: ``condition`` is the 2-norm of the terms of the worst output over the
    metric's normaliser (``pooled_condition(..., norm=2)``, ``gemm_condition(..., norm=2)``). A bias (the
    truncated mode) is not covered: its error grows with the terms' sum and exceeds this bound."""
    return LAMBDA * dot_product_roundoff(mode, inexact) * condition


def gemm_condition(a: torch.Tensor, b: torch.Tensor, expected: torch.Tensor, norm: int = 2) -> float:
    """``max_ij |terms of (a @ b)_ij|_norm / max |expected|``: the size of the terms of a GEMM's worst output
    relative to the normaliser of ``relative_error`` (``norm=1``: their absolute sum; ``norm=2``: their 2-norm)."""
    a64, b64 = a.detach().double().abs(), b.detach().double().abs()
    terms = (a64 @ b64) if norm == 1 else (a64.square() @ b64.square()).sqrt()
    top = float(expected.detach().double().abs().max()) if expected.numel() else 0.0
    return float(terms.max()) / top if top > 0 else 1.0
