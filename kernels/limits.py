"""Limits of the Triton kernels, defined once (no triton import: ``fastmil.ops`` checks them on every device)."""

MAX_HEADS = 32
"""Heads of the given-scores ``attention_pool`` kernels (``H_PAD`` is 16 or 32)."""

MAX_HIDDEN = 256
"""``hidden_dim`` of the fused gated-attention kernels (``HID_PAD`` in 16..256)."""

CHECKED_TRITON = ("3.8", "3.9")
"""Triton releases (major.minor) that ``make aot`` compiles every kernel specialisation on, for sm_80 and sm_90,
with zero register spills: 3.8 is pinned by the CUDA builds of torch 2.14, 3.9 by torch 2.15 and pip's default.
``pyproject.toml`` declares the same range."""
