"""Triton kernels of fastmil, installed as ``fastmil.kernels`` (never as a top-level ``kernels`` module).

This package holds ``@triton.jit`` kernels and their launch-grid helpers only; the autograd wrappers and the
torch references live in ``fastmil.ops``.
"""
