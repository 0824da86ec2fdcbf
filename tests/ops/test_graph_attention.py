"""graph_attention (torch path and Triton under the interpreter) against the dense fp64 reference, forward and
gradients: -1 slots, self loops on and off, several heads, ragged bags, a bag of one, channel widths spanning
several blocks with a ragged tail, fp16/bf16 inputs and non-contiguous views."""
from __future__ import annotations

import pytest
import torch

from fastmil.ops import graph_attention, graph_attention_reference, grid_neighbours
from fastmil.ops.grid_neighbours import check_stencil


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


def _check(got, want, atol, rtol=0.0):
    out, grads = got
    ref_out, ref_grads = want
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    for name, g, r in zip(("x", "score_src", "score_dst"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}")


# measured against the fp64 reference: fp32 max error 4e-7 (output), 3e-6 (gradients) on unit-scale inputs
FP32_ATOL = 2e-5


@pytest.mark.parametrize("self_loop", [True, False])
@pytest.mark.parametrize("radius", [1, 2])
def test_torch_path_fp32_and_fp64(self_loop, radius):
    sizes = [1, 90, 200, 37]
    nbr = _batch(sizes, radius)
    x, src, dst, grad = _inputs(nbr.shape[0], 3, 40)
    want = _reference(x, nbr, src, dst, grad, self_loop)
    _check(_run(x, nbr, src, dst, grad, self_loop, "torch"), want, atol=1e-12)  # fp64 path: exact to rounding
    _check(_run(x.float(), nbr, src.float(), dst.float(), grad, self_loop, "torch"), want, atol=FP32_ATOL)


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
    _check(_run(x.float(), nbr, src.float(), dst.float(), grad, self_loop, "triton"), want, atol=FP32_ATOL)


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
    _check((out.detach(), [t.grad for t in leaves]), want, atol=FP32_ATOL)
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
    eps = torch.finfo(dtype).eps
    _check(got, want, atol=4 * eps, rtol=2 * eps)


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
