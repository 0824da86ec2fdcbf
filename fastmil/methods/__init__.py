"""fastmil.methods: training objectives (plain MIL now; MHIM-MIL and SRMIL build on the same interface)."""
from .plain import PlainMIL

METHODS = {"abmil": lambda: PlainMIL("abmil"), "meanmil": lambda: PlainMIL("meanmil")}


def get_method(name: str):
    """Instantiate the training objective called ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "PlainMIL", "get_method"]
