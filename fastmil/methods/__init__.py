"""fastmil.methods: training objectives as objects: plain MIL, MHIM-MIL (SRMIL builds on the same API)."""
from .base import METHODS, Method, StepContext, StepOutput, build_method, get_method, method_config, register_method
from .ema import ema_update_
from .mhim import MHIM
from .plain import PlainMIL

__all__ = ["MHIM", "METHODS", "Method", "PlainMIL", "StepContext", "StepOutput", "build_method", "ema_update_",
           "get_method", "method_config", "register_method"]
