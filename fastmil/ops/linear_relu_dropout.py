"""``linear_relu_dropout``: the MIL embed block ``Dropout(ReLU(x W^T + b))`` as one op that keeps no mask.

Contract::

    linear_relu_dropout(x [N, D], weight [E, D], bias [E] | None, p: float, training: bool,
                        generator: torch.Generator | None = None) -> y [N, E]

    y = relu(x W^T + b) * keep / (1 - p),   keep_ij ~ Bernoulli(1 - p) independently (training and p > 0), else 1.

Differentiable in ``x``, ``weight`` and ``bias``. Autograd through ``Linear``, ``ReLU`` and ``Dropout`` keeps the
ReLU output and a boolean dropout mask (``N x E`` each) besides ``y``, and makes three passes over ``N x E`` plus
``bernoulli_``, which on a 2-core CPU costs more than the ``[10k, 1024] x [1024, 512]`` GEMM's share of a step.
Here:

- the dropout scale is folded into the GEMM (``relu(s z) = s relu(z)`` for ``s = 1 / (1 - p) > 0``): the GEMM
  writes ``s (x W^T + b)`` (with a bias, ``s`` as its alpha and beta; without, a scaled copy of ``W``), then one
  in-place ReLU and one in-place multiply by the keep mask (0/1 in ``y``'s dtype);
- the random draw is 16 bits per entry taken from 64-bit random words (4 entries per word; ~8x cheaper than
  ``bernoulli_`` here; on the CPU PCG64 words keyed from ``generator``, see :func:`_random_bits`); an entry is
  dropped when its 16 bits, read as int16, are below ``-32768 + round(p 65536)``, so ``p`` is applied to a
  resolution of 1/65536 (0.25 and 0.5 exactly, 0.1 as 0.100006), and the output is scaled by
  ``1 / (1 - p_applied)`` (:func:`effective_p`), so its expectation is exact. When ``p`` lies on the 1/256 grid
  (0.25, 0.5, 0.125...), 8 bits per entry give exactly the same probability: the torch path then draws 8 bits
  (read as uint8, dropped below ``round(p 256)``), half the random words and a narrower compare (~0.8 ms less
  per 4096 x 512 chunk here: the dropout of a 10k x 512 output costs 5.4 instead of 7.4 ms);
- backward needs no mask: ``y_ij > 0`` exactly where the entry was kept and its pre-activation was positive, so
  ``grad_pre = s * grad_y * (y > 0)`` (``s`` applied to the small gradients, not to ``grad_pre``); saved for
  backward are ``x``, ``weight`` and ``y`` (which the caller keeps anyway). ``grad_x`` is only formed when ``x``
  requires grad (features from the store do not);
- the elementwise passes run in row chunks of ``CHUNK_ROWS`` (see there).

Backends: ``torch`` (the above; the CPU path) and ``triton`` (``fastmil.kernels.linear_relu_dropout``, the default on
CUDA): one GEMM kernel whose epilogue adds the bias, applies ReLU, dropout and scale in registers and stores ``y``
once; its keep mask comes from Philox draws of ``(seed, entry index)`` with the same threshold rule, the seed drawn
from ``generator`` (default: the device's) on the device, without a host synchronisation. Under CUDA autocast the
kernel runs in the autocast dtype (weights cast, features of any float dtype converted in registers). NaN propagates
on both paths. The backward is the same for both: it reads ``y``. Its GEMMs run in the forward's compute dtype: for
fp16/bf16 (autocast or half weights) both operands in that dtype (features rounded to it, as the forward's kernel
rounds them) with fp32 accumulation, the weight gradient accumulated over the row chunks in fp32 (on CUDA a
half-precision tensor-core GEMM with an fp32 output, :func:`_add_weight_grad`); for fp32 inputs fp32 GEMMs.

Random numbers come from ``generator`` (default: torch's global generator of ``x``'s device), so a run seeded per
(seed, epoch) replays its masks, as ``nn.Dropout`` would; the masks differ from ``nn.Dropout``'s.
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels._launch import canonical
from ._backend import resolve_backend
from ._triton import HAS_TRITON, check_triton_inputs

__all__ = ["check_dropout", "dropout_threshold", "effective_p", "keep_rule", "linear_relu_dropout"]


def dropout_threshold(p: float) -> int:
    """The int16 value below which an entry's random bits drop it: ``-32768 + round(p * 65536)``."""
    return -32768 + int(round(p * 65536))


def effective_p(p: float) -> float:
    """The drop probability actually applied: ``round(p * 65536) / 65536``; the output is scaled by
    ``1 / (1 - effective_p(p))``, so the expectation is exact for the applied probability."""
    return round(p * 65536) / 65536


def keep_rule(p: float) -> tuple[torch.dtype, int]:
    """The torch path's draw for drop probability ``p``: ``(dtype, threshold)``, an entry dropped where its random
    bits, read as ``dtype``, are below ``threshold``. int16 against :func:`dropout_threshold`; uint8 against
    ``round(p 256)`` when ``p`` lies on the 1/256 grid, the same probability from half the random bits."""
    drop = int(round(p * 65536))
    if drop % 256 == 0:
        return torch.uint8, drop // 256
    return torch.int16, dropout_threshold(p)


def _random_bits(shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Uniform random ``dtype`` (int16 or uint8) ``shape``, four or eight per 64-bit random word.

    On the CPU the words are PCG64's raw output (numpy), keyed by 126 bits drawn from ``generator``: 1.1 ms for a
    4096 x 512 chunk of int16 here against 2.0 ms for torch's Mersenne Twister (``random_``), which also keys each
    draw with 32 bits only. Elsewhere torch's ``random_`` over the whole int64 range (``random_()`` alone draws
    from [0, 2^63), so its top bit, the sign of every 4th int16, would always be 0)."""
    numel = shape[0] * shape[1]
    per_word = 8 // dtype.itemsize
    n_words = (numel + per_word - 1) // per_word
    if device.type == "cpu":
        key = torch.empty(2, dtype=torch.int64).random_(generator=generator).tolist()  # 2 x 63 bits
        words = torch.from_numpy(np.random.PCG64(np.random.SeedSequence(key)).random_raw(n_words).view(np.int64))
    else:
        words = torch.empty(n_words, dtype=torch.int64, device=device)
        words.random_(-(2**63), None, generator=generator)
    return words.view(dtype)[:numel].view(shape)


CHUNK_ROWS = 4096
"""Rows per chunk of the elementwise passes (ReLU, dropout, the backward's mask): their temporaries stay a few MiB,
reused from the allocator, instead of fresh N x E buffers that a large bag pays for in page faults (measured at
100k x 512: ~0.4 s for one bool-to-float promotion of the whole matrix, against ~40 ms in chunks)."""


def _autocasting(device_type: str) -> bool:
    return device_type == "cuda" and torch.is_autocast_enabled("cuda")


def compute_dtype(device_type: str, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the Triton path multiplies in and returns: the autocast dtype under CUDA autocast (the kernel
    converts ``x`` in registers, so features of any float dtype need no copy), else ``x``'s dtype."""
    return torch.get_autocast_dtype("cuda") if _autocasting(device_type) else x_dtype


def _forward_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dropping: bool, scale: float,
                    p: float, generator: torch.Generator | None) -> torch.Tensor:
    """``y`` from the fused GEMM kernel, in :func:`compute_dtype` (16 Philox bits per entry against
    :func:`dropout_threshold`)."""
    from ..kernels.linear_relu_dropout import linear_relu_dropout_launch

    dtype = compute_dtype(x.device.type, x.dtype)
    xs = canonical(x, strided=True)
    ws = canonical(weight.to(dtype))
    bs = None if bias is None else canonical(bias.to(dtype))
    y = torch.empty(x.shape[0], weight.shape[0], dtype=dtype, device=x.device)
    seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    if dropping:  # drawn on the device from its generator: no host synchronisation
        seed.random_(generator=generator)
    linear_relu_dropout_launch(xs, ws, bs, y, seed, dropout_threshold(p), scale, dropping)()
    return y


def _forward_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dropping: bool, scale: float,
                   p: float, generator: torch.Generator | None) -> torch.Tensor:
    """``y`` from the torch path: the GEMM with the scale folded in, then the ReLU and keep-mask passes in chunks
    (random bits and threshold from :func:`keep_rule`)."""
    bits_dtype, threshold = keep_rule(p)
    if bias is None:
        y = x @ (weight * scale if dropping else weight).T
    else:  # s (x W^T + b) as the GEMM's alpha and beta: no scaled copy of the weight
        y = torch.addmm(bias, x, weight.T, beta=scale, alpha=scale)
    keep = None
    for lo in range(0, y.shape[0], CHUNK_ROWS):
        chunk = y[lo : lo + CHUNK_ROWS].relu_()
        if dropping:  # the keep mask as 0/1 in y's dtype: a multiply by it runs ~3x faster than masked_fill_,
            # and a bool mask would be converted in a pass of its own
            keep = torch.empty_like(chunk) if keep is None or keep.shape != chunk.shape else keep
            bits = _random_bits(tuple(chunk.shape), bits_dtype, y.device, generator)
            chunk.mul_(torch.ge(bits, threshold, out=keep))
    return y


def _torch_at_least(major: int, minor: int) -> bool:
    release = torch.__version__.split("+")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


HALF_GEMM_FP32_OUT = ("cuda",) if _torch_at_least(2, 10) else ()
"""Device types whose ``torch.addmm`` multiplies fp16/bf16 operands into an fp32 output (``out_dtype`` with an fp32
``self``: CUDA, from torch 2.10; older releases take the exact-upcast path below)."""


def _add_weight_grad(grad_w: torch.Tensor, grad_pre: torch.Tensor, x: torch.Tensor, first: bool) -> None:
    """``grad_w (+)= grad_pre^T x`` for one chunk of rows (``first``: ``=``, whatever ``grad_w`` holds), ``grad_w``
    fp32 (fp64 for fp64 weights), ``grad_pre`` in the forward's compute dtype.

    fp16/bf16 ``grad_pre`` (the compute dtype under autocast, or half weights): a GEMM of operands in that dtype with
    fp32 accumulation, as the forward's GEMM (``x`` is rounded to the dtype as the forward's kernel rounds it in
    registers: the gradient of what was computed). On CUDA that is one half-precision tensor-core GEMM writing fp32
    into ``grad_w`` (``out_dtype``; 100k x 1024 -> 512 is 105 GFLOP, which fp32 operands would run on the CUDA cores).
    Elsewhere (no half GEMM with an fp32 output, and no fast bf16 GEMM on CPUs) the half operands are upcast to fp32,
    exactly, and multiplied in fp32: the same exact products (two fp16/bf16 significands fit in fp32's) and the
    same fp32 accumulation. fp32/fp64 ``grad_pre``: the GEMM in that dtype."""
    beta = 0.0 if first else 1.0  # beta = 0 ignores what grad_w holds (the first chunk needs no zero fill)
    if grad_pre.dtype in (torch.float16, torch.bfloat16):
        x = x.to(grad_pre.dtype)
        if grad_pre.device.type in HALF_GEMM_FP32_OUT:
            torch.addmm(grad_w, grad_pre.T, x, beta=beta, out_dtype=grad_w.dtype, out=grad_w)
            return
    grad_w.addmm_(grad_pre.T.to(grad_w.dtype), x.to(grad_w.dtype), beta=beta)


class _LinearReLUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p, training, generator, use_triton):
        p = effective_p(p)
        dropping = training and p > 0.0
        scale = 1.0 / (1.0 - p) if dropping else 1.0
        forward = _forward_triton if use_triton else _forward_torch
        y = forward(x, weight, bias, dropping, scale, p, generator)
        ctx.save_for_backward(x, weight, y)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # the first chunk's GEMM writes grad_w (beta = 0 ignores the uninitialised memory): no zero fill
        new_grad_w = torch.empty if y.shape[0] else torch.zeros
        grad_w = new_grad_w(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        w_scaled = (weight * scale).to(grad_y.dtype) if need_x else None
        for lo in range(0, y.shape[0], CHUNK_ROWS):
            rows = slice(lo, lo + CHUNK_ROWS)
            # relu and dropout gradients in one pass: y > 0 exactly where the entry was kept and positive;
            # the dropout scale goes onto the small results, not onto this chunk
            grad_pre = torch.ops.aten.threshold_backward(grad_y[rows], y[rows], 0)  # grad_y * (y > 0) in one pass
            if need_w:
                _add_weight_grad(grad_w, grad_pre, x[rows], first=lo == 0)
            if need_b:
                grad_b += grad_pre.sum(0, dtype=acc)
            if need_x:
                grad_x[rows] = grad_pre @ w_scaled
        return (grad_x, None if grad_w is None else grad_w.mul_(scale).to(weight.dtype),
                None if grad_b is None else grad_b.mul_(scale).to(weight.dtype), None, None, None, None)


def check_dropout(p: float) -> None:
    """``p`` must be in [0, 1) and apply as less than 1 at the 1/65536 resolution of the random draws."""
    if not 0.0 <= p < 1.0 or effective_p(p) >= 1.0:
        raise ValueError(f"dropout p must be in [0, 1 - 2^-17), got {p}")


def linear_relu_dropout(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: float, training: bool,
    generator: torch.Generator | None = None, backend: str = "auto",
) -> torch.Tensor:
    """See the module docstring. ``x`` and ``weight`` share a dtype (under autocast the GEMM's). ``backend``:
    ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``; ``FASTMIL_BACKEND`` overrides
    ``"auto"``."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_relu_dropout: x [N, D] and weight [E, D] expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    check_dropout(p)
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"linear_relu_dropout: the generator is on {generator.device}, the tensors on {x.device}")
    use_triton = resolve_backend(backend, "linear_relu_dropout", x.device, has_triton=HAS_TRITON) == "triton"
    if use_triton:
        check_triton_inputs("linear_relu_dropout", x.dtype, x.shape[1], x, weight, bias)
        mixed = weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)
        if mixed and not _autocasting(x.device.type):  # under autocast any float dtypes (the autocast dtype's)
            raise TypeError(f"linear_relu_dropout: x, weight and bias must share a dtype on the Triton path, got "
                            f"{x.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")
    return _LinearReLUDropout.apply(x, weight, bias, p, training, generator, use_triton)
