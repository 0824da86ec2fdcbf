"""graph_attention (torch path and Triton under the interpreter) against the dense fp64 reference, forward and
gradients: -1 slots, self loops on and off, several heads, ragged bags, a bag of one, channel widths spanning
several blocks with a ragged tail, fp16/bf16 inputs and non-contiguous views.

Tolerances follow tests/tolerance.py: a row's softmax and weighted sum run over its K + 1 edges, the backward over the
reverse edges again (depth 4 (K + 1) + 8), and an edge score ``dst_i + src_j`` is rounded at its own size, which
``exp`` turns into a relative error of the edge's weight; each edge's term carries its own factor (``_bounds``).
"""
from __future__ import annotations

import math

import pytest
import torch

from fastmil.ops import graph_attention, graph_attention_reference, grid_neighbours
from fastmil.ops.grid_neighbours import check_stencil
from tests.tolerance import LAMBDA, check, family_of, output_rounding, unit_roundoff


def _batch(sizes, radius, seed=0):
    """Ragged bags of patches on a 16 x 16 lattice with ~30% holes (so many slots are -1)."""
    g = torch.Generator().manual_seed(seed)
    coords = []
    for n in sizes:
        cells = torch.randperm(256, generator=g)[:n]
        coords.append(torch.stack([cells % 16 * 224, cells // 16 * 224], 1))
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    nbr = grid_neighbours(torch.cat(coords), offsets, radius, step=224)
    check_stencil(nbr)
    return nbr


def _inputs(n, heads, channels, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, heads, channels, generator=g, dtype=torch.float64)
    src = torch.randn(n, heads, generator=g, dtype=torch.float64) * 2
    dst = torch.randn(n, heads, generator=g, dtype=torch.float64) * 2
    grad = torch.randn(n, heads, channels, generator=g, dtype=torch.float64)
    return x, src, dst, grad


def _reference(x, nbr, src, dst, grad, self_loop, slope=0.2):
    leaves = [t.detach().clone().requires_grad_() for t in (x, src, dst)]
    out = graph_attention_reference(leaves[0], nbr, leaves[1], leaves[2], slope, self_loop)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def _run(x, nbr, src, dst, grad, self_loop, backend, slope=0.2):
    leaves = [t.detach().clone().requires_grad_() for t in (x, src, dst)]
    out = graph_attention(leaves[0], nbr, leaves[1], leaves[2], slope, self_loop, backend=backend)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


FAMILY = "graph_attention"


def _bounds(x, nbr, src, dst, grad, self_loop, dtype=torch.float32, slope=0.2, saved_dtype=None):
    """Absolute bounds of (out, grad x, grad score_src, grad score_dst), each the largest over its elements of
    ``LAMBDA u sum_edges |term| F``, from an fp64 pass over the edges. ``F = sqrt(4 (K + 1) + 8) + |e_ij| + |e_ij -
    m_i| + 1`` per edge: the softmax and weighted sum over the K + 1 edges and the backward's again (depth), and the
    roundings of the edge score ``e_ij`` and of ``e_ij - m_i`` at their size, which ``exp`` makes a relative error
    of the edge's weight. The terms: ``a_ij |x_j|`` (out), ``a_ij |g_i|`` (grad x, summed over the reverse edges),
    ``a_ij (|d_ij| F + sqrt(C) |g_i * (x_j - out_i)|_2)`` with ``d_ij = g_i . (x_j - out_i)`` (score gradients: dst
    over a row's edges, src over the reverse edges).
    ``saved_dtype``: the forward's output is kept in that (half) dtype for the backward's ``g_i . out_i``, one more
    rounding of it in the score gradients."""
    x, src, dst, grad = (t.detach().double() for t in (x, src, dst, grad))
    n, k = nbr.shape
    idx = torch.cat([nbr.long(), torch.arange(n)[:, None]], 1)  # [N, K+1], the last slot is the row itself
    valid = torch.cat([nbr >= 0, torch.full((n, 1), self_loop)], 1)
    safe = idx.clamp(min=0)
    e = torch.nn.functional.leaky_relu(dst[:, None, :] + src[safe], slope)  # [N, K+1, H]
    m = e.masked_fill(~valid[:, :, None], float("-inf")).amax(1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    alpha = torch.softmax(e.masked_fill(~valid[:, :, None], float("-inf")), 1).nan_to_num(0.0)
    factor = math.sqrt(4 * (k + 1) + 8) + e.abs() + (e - m).abs() + 1
    weighted = alpha * factor  # [N, K+1, H]
    out_abs = (alpha[..., None] * x[safe].abs()).sum(1)  # [N, H, C]
    out_terms = (weighted[..., None] * x[safe].abs()).sum(1)
    reverse = lambda t: torch.zeros((n, *t.shape[2:]), dtype=t.dtype).index_add_(  # noqa: E731
        0, safe[valid], t[valid])
    grad_x_terms = reverse(weighted[..., None] * grad.abs()[:, None])
    # the score gradients sum a_ij d_ij over edges, d_ij = g_i . (x_j - out_i): the weight's error times |d_ij|, and
    # the dot's own C roundings (the 2-norm of its terms times sqrt(C))
    out = (alpha[..., None] * x[safe]).sum(1)
    diff = grad[:, None] * (x[safe] - out[:, None])  # [N, K+1, H, C]
    dots = diff.sum(-1).abs() * factor + math.sqrt(x.shape[2]) * diff.square().sum(-1).sqrt()
    score_terms = alpha * dots  # [N, K+1, H]
    scale = LAMBDA * unit_roundoff(dtype)
    bounds = [scale * float(t.max()) if t.numel() else 0.0
              for t in (out_terms, grad_x_terms, reverse(score_terms), score_terms.sum(1))]
    if saved_dtype is not None and n:
        saved = alpha * (grad.abs() * out_abs).sum(-1)[:, None]  # a_ij |g_i| . |out_i| per edge
        bounds[2] += output_rounding(saved_dtype) * float(reverse(saved).max())
        bounds[3] += output_rounding(saved_dtype) * float(saved.sum(1).max())
    return bounds


def _check(got, want, bounds, what="", extra=0.0, family=FAMILY):
    """Each output's largest absolute error against its bound (plus ``extra`` times its largest reference value:
    the rounding of a half-precision output)."""
    out, grads = got
    ref_out, ref_grads = want
    for name, g, r, bound in zip(("out", "grad x", "grad score_src", "grad score_dst"), (out, *grads),
                                 (ref_out, *ref_grads), bounds):
        error = float((g.double() - r).abs().max())
        check(error, bound + extra * float(r.abs().max()), family, f"{name} {what}".strip())


@pytest.mark.parametrize("self_loop", [True, False])
@pytest.mark.parametrize("radius", [1, 2])
def test_torch_path_fp32_and_fp64(self_loop, radius):
    sizes = [1, 90, 200, 37]
    nbr = _batch(sizes, radius)
    x, src, dst, grad = _inputs(nbr.shape[0], 3, 40)
    want = _reference(x, nbr, src, dst, grad, self_loop)
    _check(_run(x, nbr, src, dst, grad, self_loop, "torch"), want,
           _bounds(x, nbr, src, dst, grad, self_loop, torch.float64), "fp64")
    _check(_run(x.float(), nbr, src.float(), dst.float(), grad, self_loop, "torch"), want,
           _bounds(x, nbr, src, dst, grad, self_loop))


def test_rows_without_edges_give_zeros_not_nan():
    nbr = _batch([1, 5], 1)  # the bag of one has no neighbour; without self loops it has no edge at all
    x, src, dst, grad = _inputs(nbr.shape[0], 2, 8)
    for backend in ("torch", "triton"):
        out, grads = _run(x.float(), nbr, src.float(), dst.float(), grad, False, backend)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert all(torch.isfinite(g).all() for g in grads)
        assert grads[0][0].abs().sum() == 0  # nobody attends to an isolated row


@pytest.mark.parametrize("self_loop", [True, False])
def test_triton_matches_the_reference(self_loop):
    """Ragged bags (sizes not multiples of the 32-row block), radius 2 (K = 24), 2 heads of 40 channels."""
    nbr = _batch([1, 45, 30], 2)
    x, src, dst, grad = _inputs(nbr.shape[0], 2, 40)
    want = _reference(x, nbr, src, dst, grad, self_loop)
    _check(_run(x.float(), nbr, src.float(), dst.float(), grad, self_loop, "triton"), want,
           _bounds(x, nbr, src, dst, grad, self_loop))


def test_triton_channels_over_several_blocks_with_a_tail_and_a_strided_view():
    """One head of 80 channels (two channel blocks of 64, the second ragged), x a column slice of a wider
    tensor, the incoming gradient transposed-contiguous: every input layout goes through ``canonical``."""
    nbr = _batch([33, 20], 1, seed=3)
    x, src, dst, grad = _inputs(nbr.shape[0], 1, 80, seed=4)
    want = _reference(x, nbr, src, dst, grad, True)
    wide = torch.cat([x.float(), torch.full_like(x.float(), float("nan"))], 2)[:, :, :80]
    leaves = [wide.detach().requires_grad_(), src.float().requires_grad_(), dst.float().requires_grad_()]
    out = graph_attention(leaves[0], nbr, leaves[1], leaves[2], backend="triton")
    out.backward(grad.float().transpose(0, 2).contiguous().transpose(0, 2))
    _check((out.detach(), [t.grad for t in leaves]), want, _bounds(x, nbr, src, dst, grad, True))
    assert leaves[0].grad.shape == wide.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_inputs_accumulate_in_fp32(dtype, backend):
    """Against the reference on the rounded inputs: only the output's own rounding remains."""
    nbr = _batch([40, 25], 1, seed=5)
    x, src, dst, grad = _inputs(nbr.shape[0], 2, 24, seed=6)
    x, src, dst = x.to(dtype), src.to(dtype), dst.to(dtype)
    want = _reference(x.double(), nbr, src.double(), dst.double(), grad.to(dtype).double(), True)
    got = _run(x, nbr, src, dst, grad.to(dtype), True, backend)
    assert got[0].dtype == dtype and got[1][0].dtype == dtype
    # fp32 accumulation, then one rounding to the output dtype (relative to the output's largest value)
    bounds = _bounds(x, nbr, src, dst, grad.to(dtype), True, saved_dtype=dtype if backend == "triton" else None)
    _check(got, want, bounds, extra=output_rounding(dtype), family=family_of(FAMILY, dtype))


def test_bad_inputs():
    nbr = _batch([5], 1)
    x, src, dst, _ = _inputs(5, 2, 4)
    with pytest.raises(ValueError, match="x must be a float"):
        graph_attention(x[:, 0], nbr, src, dst)
    with pytest.raises(ValueError, match="nbr must be an integer"):
        graph_attention(x, nbr.float(), src, dst)
    with pytest.raises(ValueError, match="score_src must be"):
        graph_attention(x, nbr, src[:, :1], dst)
    with pytest.raises(ValueError, match="negative_slope"):
        graph_attention(x, nbr, src, dst, negative_slope=-1.0)


@pytest.mark.parametrize("where", ["score", "feature"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_non_finite_input_reaches_the_rows_that_attend_to_it(where, backend):
    """A NaN source score or feature of one row (the one with most neighbours) makes the output of every row
    with an edge to it NaN (its softmax or weighted sum), not zeros, and leaves the rows without such an edge and
    their gradients finite. On a GPU ``max`` drops NaN, so the NaN arrives only in the softmax's sum, which the
    kernel once tested with ``> 0`` (the no-edge branch: zeros); the interpreter's ``maximum`` propagates NaN, so
    here this test guards the contract, not that particular bug."""
    nbr = _batch([40, 25], 1, seed=7)
    x, src, dst, grad = _inputs(nbr.shape[0], 2, 8, seed=8)
    x, src, dst = x.float(), src.float(), dst.float()
    bad = int((nbr >= 0).sum(1).argmax())
    if where == "score":
        src[bad, 0] = float("nan")
    else:
        x[bad, 0, 2] = float("nan")
    leaves = [t.detach().clone().requires_grad_() for t in (x, src, dst)]
    out = graph_attention(leaves[0], nbr, leaves[1], leaves[2], backend=backend)
    hears = (nbr == bad).any(1)
    hears[bad] = True  # the self loop
    assert hears.sum() > 1 and torch.isnan(out[hears]).any(dim=(1, 2)).all()
    assert torch.isfinite(out[~hears]).all()
    (out[~hears].float() * grad[~hears].float()).sum().backward()
    clean = ~hears & ~(nbr[:, None, :] == torch.nonzero(hears)[:, 0][None, :, None]).any((1, 2))  # no edge to them
    assert torch.isfinite(leaves[1].grad[clean]).all() and torch.isfinite(leaves[0].grad[clean]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["stale", "far", "negative", "int32-stale"])
def test_neighbour_rows_outside_the_batch_are_refused(case, backend):
    """A table entry outside ``[-1, N)``: a stale table (row N: built for a larger batch, or kept after rows were
    dropped), a row far beyond, a negative entry other than the -1 sentinel. The Triton kernels gather through the
    table unchecked (out of bounds on a GPU), the torch path used to raise an IndexError or skip -2 silently: both
    refuse it with the entry named, before any launch."""
    nbr = _batch([6, 5], 1, seed=3)
    n = nbr.shape[0]
    row, slot = 4, 2
    bad = {"stale": n, "far": 10 * n, "negative": -2, "int32-stale": n}[case]
    nbr[row, slot] = bad
    if case == "int32-stale":
        nbr = nbr.int()
    x, src, dst, _ = (t.float() for t in _inputs(n, 2, 8))
    with pytest.raises(ValueError, match=rf"nbr\[{row}, {slot}\] = {bad} is outside \[-1, {n}\)"):
        graph_attention(x, nbr, src, dst, backend=backend)
    nbr[row, slot] = -1  # the sentinel is fine
    graph_attention(x, nbr, src, dst, backend=backend)


def test_neighbour_rows_are_checked_on_the_device_without_a_host_read(monkeypatch):
    """Off the CPU the check is one device-side assertion (``torch._assert_async``: no host synchronisation in a
    training step): on meta tensors, whose values cannot be read at all, it runs and asserts on a device flag."""
    from fastmil.ops.graph_attention import check_neighbour_rows

    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda flag, msg: calls.append((flag.device.type, flag.shape, msg)))
    check_neighbour_rows(torch.empty(7, 8, dtype=torch.int64, device="meta"), 7)
    assert calls == [("meta", torch.Size([]), calls[0][2])] and "outside [-1, 7)" in calls[0][2]
    check_neighbour_rows(torch.empty(0, 8, dtype=torch.int64, device="meta"), 0)  # an empty table: nothing to check
    assert len(calls) == 1
