"""fastmil.nn: attention pooling and MIL models over packed ragged bags, and the model registry."""
from .abmil import ABMIL, MeanPoolMIL
from .attention import AttentionPool, GatedAttentionPool, MeanPool
from .output import MILOutput
from .registry import MODELS, build_model, model_config, register_model

__all__ = [
    "ABMIL", "AttentionPool", "GatedAttentionPool", "MILOutput", "MODELS", "MeanPool", "MeanPoolMIL", "build_model",
    "model_config", "register_model",
]
