"""Second derivatives (a gradient penalty: ``grad(loss, x, create_graph=True)`` then ``backward``) through every
custom autograd Function of ``fastmil.ops``: exact where the backward is itself differentiable (checked with
``gradgradcheck`` in fp64), a clear error everywhere else. Before, the Triton backwards returned gradients without a
graph (a gradient penalty silently contributed nothing), and the torch paths of ``layer_norm_prelu`` and
``reconstruction_loss`` differentiated their backward's in-place arithmetic into a wrong second derivative."""
from __future__ import annotations

import pytest
import torch

from fastmil.ops import (
    attention_pool,
    gated_attention_pool,
    graph_attention,
    linear_relu_dropout,
    normalized_attention_pool,
    reconstruction_loss,
)
from fastmil.ops.layer_norm_prelu import layer_norm_prelu

OFFSETS = torch.tensor([0, 3, 7])
NBR = torch.tensor([[1, -1], [-1, 0], [-1, -1], [-1, -1], [-1, -1], [-1, -1], [-1, -1]])


def _leaves(dtype, *shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _cases(dtype, backend):
    """name -> (function of the leaves, leaves) for every op, on ``backend`` where the op has two."""
    gate = [(3, 4), (3,), (3, 4), (3,), (1, 3), (1,)]
    return {
        "attention_pool": (lambda s, v: attention_pool(s, v, OFFSETS, backend=backend)[0],
                           _leaves(dtype, (7,), (7, 4))),
        "gated_attention_pool": (lambda h, *p: gated_attention_pool(h, *p, OFFSETS, backend=backend)[0],
                                 _leaves(dtype, (7, 4), *gate)),
        "graph_attention": (lambda x, a, b: graph_attention(x, NBR, a, b, backend=backend),
                            _leaves(dtype, (7, 1, 4), (7, 1), (7, 1))),
        "linear_relu_dropout": (lambda x, w, b: linear_relu_dropout(x, w, b, 0.0, True, backend=backend),
                                _leaves(dtype, (7, 4), (5, 4), (5,))),
        "normalized_attention_pool": (lambda x, u: normalized_attention_pool(x, u, OFFSETS)[0],
                                      _leaves(dtype, (7, 4), (4, 3))),
        "reconstruction_loss": (lambda p, t: reconstruction_loss(p, t, torch.tensor([True, False, True] * 2 + [True])),
                                _leaves(dtype, (7, 4), (7, 4))),
        "layer_norm_prelu": (lambda x, w, b, a: layer_norm_prelu(x, w, b, a), _leaves(dtype, (7, 4), (4,), (4,), (1,))),
    }


TWICE_DIFFERENTIABLE = {"attention_pool/torch", "linear_relu_dropout/torch", "linear_relu_dropout/triton"}
"""Backwards made of differentiable torch operations only (``linear_relu_dropout`` shares its torch backward
between both paths)."""


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(_cases(torch.float32, "torch")))
def test_second_derivative_is_exact_or_refused(name, backend):
    if backend == "triton" and name in ("normalized_attention_pool", "reconstruction_loss", "layer_norm_prelu"):
        pytest.skip(f"{name} has no Triton path")
    dtype = torch.float64 if backend == "torch" else torch.float32  # the Triton path takes fp32/fp16/bf16
    fn, leaves = _cases(dtype, backend)[name]
    if f"{name}/{backend}" in TWICE_DIFFERENTIABLE:
        if backend == "torch":
            assert torch.autograd.gradgradcheck(fn, leaves)
        return
    out = fn(*leaves)
    head = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
    # a loss through a learned head, as in training: the gradient reaching the op depends on parameters
    first = torch.autograd.grad((out * head).sum(), leaves[0], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.square().sum().backward()
