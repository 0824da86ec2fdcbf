"""fastmil.nn: attention pooling and MIL models over packed ragged bags."""
from .abmil import ABMIL, MeanPoolMIL
from .attention import AttentionPool, GatedAttentionPool, MeanPool

__all__ = ["ABMIL", "AttentionPool", "GatedAttentionPool", "MeanPool", "MeanPoolMIL"]
