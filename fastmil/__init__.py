"""fastmil: multiple-instance learning on whole-slide images at full scale.

The one data structure every layer speaks is :class:`fastmil.Bags`, a packed ragged batch of slides.
"""
from .bags import Bags

__version__ = "0.1.0"
__all__ = ["Bags", "__version__"]
