"""The magnitude of each parameter gradient's terms: the normaliser of a gradient comparison whose sums cancel
(tests/tolerance.py, ``condition``). Shared by the module tests that compare gradients against a reference."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tests.tolerance import check_close


@contextmanager
def unfused(model):
    """The fused embedding block and one-branch gated pool as the module compositions they fuse (same values up to
    rounding), so that every ``nn.Linear`` is called as a module and :func:`gradient_terms` sees it."""
    from fastmil.ops import attention_pool

    def embed(x):
        return F.relu(model.embed.linear(x))  # dropout 0 in these tests

    def pool(h, offsets, mask=None, offsets_cpu=None, return_lse=False, sparse_grad=False):
        return attention_pool(model.pool.scores(h), h, offsets, mask, offsets_cpu=offsets_cpu, return_lse=return_lse)

    patched = [(model.embed, embed)] if hasattr(model, "embed") else []
    patched += [(model.pool, pool)] if hasattr(model, "pool") else []
    for module, forward in patched:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in patched:
            del module.forward


def gradient_terms(model, loss_of) -> dict[str, float]:
    """The magnitude of the terms of each ``nn.Linear`` parameter's gradient, the normaliser of its error.

    A Linear's weight gradient is the sum over its input rows of ``delta_i x_i^T`` and its bias gradient the sum of
    the ``delta_i`` (``delta``: the gradient of its output). Those sums cancel, structurally so on the attention
    path (the score gradients ``a_i (u_i - c)`` sum to exactly 0 over a bag: the score layer's bias gets a zero
    gradient, rounding alone) and for CLAM's instance-clustering biases (softmax minus one-hot over rows of both
    targets). A sum's rounding error is relative to the sum of its terms' magnitudes (tests/tolerance.py), here
    ``|delta|^T |x|`` and ``sum_i |delta_i|``; their largest entry is the scale of the gradient's comparison (the
    condition built in: >= the gradient's own largest entry). ``loss_of()`` runs the forward pass (through the
    unfused modules) and returns the loss."""
    terms: dict[str, torch.Tensor] = {}
    handles = []

    def on_forward(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs()

            def on_grad(grad):
                delta = grad.detach().reshape(-1, grad.shape[-1]).abs()
                terms[f"{name}.weight"] = terms.get(f"{name}.weight", 0) + delta.T @ x
                if module.bias is not None:
                    terms[f"{name}.bias"] = terms.get(f"{name}.bias", 0) + delta.sum(0)

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(on_forward(name)))
    try:
        with unfused(model):
            params = [p for p in model.parameters() if p.requires_grad]
            torch.autograd.grad(loss_of(), params, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return {key: float(t.max()) for key, t in terms.items()}


def close_grads(got: dict, want: dict, bound: float, family: str, what: str, terms: dict[str, float]) -> None:
    """Each parameter's gradient against its reference, relative to the magnitude of its terms where
    :func:`gradient_terms` has them (else to its largest entry)."""
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key, grad in want.items():
        scale = max(terms[key], float(grad.abs().max())) if key in terms else None
        check_close(got[key], grad, bound, family, f"{what} {key}", scale)
