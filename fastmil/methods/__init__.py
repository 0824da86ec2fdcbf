"""fastmil.methods: training objectives as objects: plain MIL, MHIM-MIL, SRMIL, MHIM+SRMIL."""
from .base import (
    METHODS,
    Method,
    StepContext,
    StepOutput,
    build_method,
    get_method,
    method_config,
    model_objective,
    register_method,
)
from .ema import ema_update_
from .mhim import MHIM
from .plain import PlainMIL
from .srmil import MHIMSRMIL, SRMIL

__all__ = ["MHIM", "MHIMSRMIL", "METHODS", "Method", "PlainMIL", "SRMIL", "StepContext", "StepOutput", "build_method",
           "ema_update_", "get_method", "method_config", "model_objective", "register_method"]
