"""fastmil ops: one file per op (torch reference, autograd Functions, backend dispatch)."""
from ._backend import BACKENDS, resolve_backend
from .attention_pool import attention_pool, attention_pool_reference
from .gated_attention_pool import gated_attention_pool, gated_attention_pool_reference
from .graph_attention import graph_attention, graph_attention_reference
from .grid_neighbours import grid_neighbours
from .linear_relu_dropout import linear_relu_dropout
from .normalized_attention_pool import normalized_attention_pool, normalized_attention_pool_reference
from .reconstruction_loss import reconstruction_loss
from .saliency_mask import SaliencyMask, saliency_mask

__all__ = [
    "BACKENDS",
    "attention_pool",
    "attention_pool_reference",
    "gated_attention_pool",
    "gated_attention_pool_reference",
    "graph_attention",
    "graph_attention_reference",
    "grid_neighbours",
    "linear_relu_dropout",
    "normalized_attention_pool",
    "normalized_attention_pool_reference",
    "reconstruction_loss",
    "resolve_backend",
    "SaliencyMask",
    "saliency_mask",
]
