"""Name maps between an adapter's tensor names and a checkpoint's: data plus small functions, chosen by the
checkpoint's detected layout (:func:`layout_of`). Formats and the plan resolve names only through here.
"""

from __future__ import annotations

from . import diffusers_ldm, flux, wan  # noqa: F401  (the model families' layouts register themselves, in detection order)
from .kohya import KohyaNames
from .layout import Layout, LayoutKind, layout_of, register_layout, registered_layouts
from .prefixes import PrefixMap

__all__ = ["KohyaNames", "Layout", "LayoutKind", "PrefixMap", "layout_of", "register_layout", "registered_layouts"]
