"""fastmil ops: one file per op (torch reference, autograd Function, backend dispatch)."""
from ._backend import BACKENDS, resolve_backend
from .attention_pool import attention_pool, attention_pool_reference

__all__ = ["BACKENDS", "attention_pool", "attention_pool_reference", "resolve_backend"]
