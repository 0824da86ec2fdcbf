"""layer_norm_prelu equals F.prelu(F.layer_norm(...)) in value and gradient (fp64), and rejects bad shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmil.ops.layer_norm_prelu import layer_norm_prelu
from tests.ragged import relative_error
from tests.tolerance import check, rounding_bound

FAMILY = "layer_norm_prelu"


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
    # two fp64 evaluations in other orders: each within its bound, the pair within twice. A row's mean and variance
    # sum D terms, and subtracting the mean cancels: the normalised value errs by u sqrt(2D) |x - mean| / std, so
    # the condition is max |x| / min std (the rows' raw size over their spread)
    xd = x.detach()
    condition = float(xd.abs().max() / xd.std(1, unbiased=False).min())
    check(relative_error(out, ref), 2 * rounding_bound(2 * 19 + 4, torch.float64, condition=condition), FAMILY,
          "fp64 out vs chain")
    # the backward sums over D (grad x, per row) and over the 37 rows (grad w, b, a, per entry) terms that cancel:
    # each relative to its largest value times the magnitude of its terms over that value (fp64, from the data)
    with torch.no_grad():
        std = xd.std(1, unbiased=False, keepdim=True)
        normed = (xd - xd.mean(1, keepdim=True)) / std
        y = normed * w + b
        slope = torch.where(y > 0, torch.ones_like(y), a.detach().expand_as(y))
        g_hat = (grad * slope * w).abs()  # the gradient reaching the normalised values
        magnitudes = {
            "x": (g_hat + g_hat.mean(1, keepdim=True) + normed.abs() * (g_hat * normed.abs()).mean(1, keepdim=True))
            / std * condition,
            "w": (grad * slope * normed).abs().sum(0),
            "b": (grad * slope).abs().sum(0),
            "a": (grad * y).abs()[y <= 0].sum(),
        }
    for name, gg, ww in zip("xwba", got, want):
        depth = 3 * 19 + 37 + 8
        cond = max(float(magnitudes[name].max()) / float(ww.abs().max()), 1.0)
        check(relative_error(gg, ww), 2 * rounding_bound(depth, torch.float64, condition=cond), FAMILY,
              f"fp64 grad {name} vs chain")
    assert torch.autograd.gradcheck(layer_norm_prelu, (x, w, b, a))


def test_bad_shapes():
    with pytest.raises(ValueError, match="layer_norm_prelu"):
        layer_norm_prelu(torch.zeros(3, 4), torch.ones(5), torch.zeros(4), torch.ones(1))
