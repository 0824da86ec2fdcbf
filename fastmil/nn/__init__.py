"""fastmil.nn: attention pooling and MIL models over packed ragged bags, and the model registry."""
from .abmil import ABMIL, MeanPoolMIL
from .attention import AttentionPool, GatedAttentionPool, MeanPool, pool_with_tokens
from .embed import EmbedBlock
from .output import MILOutput
from .recycle import GlobalRecycleNetwork, recycle_reference
from .registry import MODELS, build_model, model_config, register_model

__all__ = [
    "ABMIL", "AttentionPool", "EmbedBlock", "GatedAttentionPool", "GlobalRecycleNetwork", "MILOutput", "MODELS",
    "MeanPool", "MeanPoolMIL", "build_model", "model_config", "pool_with_tokens", "recycle_reference", "register_model",
]
