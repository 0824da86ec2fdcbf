"""fastmil.nn: attention pooling, graph attention and MIL models over packed ragged bags, and the model registry."""
from .abmil import ABMIL, MeanPoolMIL
from .attention import (
    AttentionPool,
    GatedAttentionPool,
    GatedBranchPool,
    MeanPool,
    pool_with_tokens,
    predicted_class_attention,
)
from .base import EmbeddedMIL
from .clam import CLAM_MB, CLAM_SB
from .dsmil import DSMIL
from .embed import EmbedBlock
from .graph import GraphAttentionLayer, GraphDecoder, GraphMIL, SupernodeReadout, bag_neighbours
from .output import MILOutput
from .recycle import GlobalRecycleNetwork, recycle_reference
from .registry import MODELS, build_model, model_config, register_model
from .transmil import TransMIL

__all__ = [
    "ABMIL", "AttentionPool", "CLAM_MB", "CLAM_SB", "DSMIL", "EmbedBlock", "EmbeddedMIL", "GatedAttentionPool",
    "GatedBranchPool", "GlobalRecycleNetwork", "GraphAttentionLayer", "GraphDecoder", "GraphMIL", "MILOutput", "MODELS",
    "MeanPool", "MeanPoolMIL", "SupernodeReadout", "TransMIL", "bag_neighbours", "build_model", "model_config",
    "pool_with_tokens", "predicted_class_attention", "recycle_reference", "register_model",
]
