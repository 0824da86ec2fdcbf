"""fastmil.methods: training objectives as objects (plain MIL now; MHIM-MIL and SRMIL build on the same API)."""
from .base import METHODS, Method, StepContext, StepOutput, build_method, get_method, method_config, register_method
from .ema import ema_update_
from .plain import PlainMIL

__all__ = ["METHODS", "Method", "PlainMIL", "StepContext", "StepOutput", "build_method", "ema_update_", "get_method",
           "method_config", "register_method"]
