"""Name maps between an adapter's tensor names and a checkpoint's: data plus small functions, chosen by the
checkpoint's detected layout (:func:`layout_of`). Formats and the plan resolve names only through here.
"""

from __future__ import annotations

from .kohya import KohyaNames
from .layout import Layout, layout_of
from .prefixes import PrefixMap

__all__ = ["KohyaNames", "Layout", "PrefixMap", "layout_of"]
