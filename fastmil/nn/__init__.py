"""fastmil.nn: attention pooling, graph attention and MIL models over packed ragged bags, and the model registry."""
from .abmil import ABMIL, MeanPoolMIL
from .attention import AttentionPool, GatedAttentionPool, MeanPool, pool_with_tokens
from .embed import EmbedBlock
from .graph import GraphAttentionLayer, GraphDecoder, GraphMIL, SupernodeReadout, bag_neighbours
from .output import MILOutput
from .recycle import GlobalRecycleNetwork, recycle_reference
from .registry import MODELS, build_model, model_config, register_model

__all__ = [
    "ABMIL", "AttentionPool", "EmbedBlock", "GatedAttentionPool", "GlobalRecycleNetwork", "GraphAttentionLayer",
    "GraphDecoder", "GraphMIL", "MILOutput", "MODELS", "MeanPool", "MeanPoolMIL", "SupernodeReadout", "bag_neighbours",
    "build_model", "model_config", "pool_with_tokens", "recycle_reference", "register_model",
]
