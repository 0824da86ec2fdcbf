"""layer_norm_prelu equals F.prelu(F.layer_norm(...)) in value and gradient (fp64), and rejects bad shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmil.ops.layer_norm_prelu import layer_norm_prelu


def test_equals_the_module_chain_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 19, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = torch.randn(19, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(19, generator=g, dtype=torch.float64).requires_grad_()
    a = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    grad = torch.randn(37, 19, generator=g, dtype=torch.float64)
    out = layer_norm_prelu(x, w, b, a)
    got = torch.autograd.grad(out, (x, w, b, a), grad)
    ref = F.prelu(F.layer_norm(x, (19,), w, b), a)
    want = torch.autograd.grad(ref, (x, w, b, a), grad)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for name, gg, ww in zip("xwba", got, want):
        torch.testing.assert_close(gg, ww, atol=1e-10, rtol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")
    assert torch.autograd.gradcheck(layer_norm_prelu, (x, w, b, a))


def test_bad_shapes():
    with pytest.raises(ValueError, match="layer_norm_prelu"):
        layer_norm_prelu(torch.zeros(3, 4), torch.ones(5), torch.zeros(4), torch.ones(1))
