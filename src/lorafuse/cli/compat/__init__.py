"""Drop-in replacements for the scripts lorafuse replaced, with their flags and environment variables unchanged
(users' scripts rely on them): ``merge-adapter`` (merge_adapter.py), ``lora-extractor`` (lora_extractor.py) and
``lora-merger`` (lora_merger.py).

The console scripts point at the functions below, not at those modules: they size the thread pools before the
command's module loads numpy (its BLAS pool reads the variables when it starts).
"""

from __future__ import annotations

from collections.abc import Sequence

from ...cpus import calm_thread_pools


def merge_adapter_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``merge-adapter``."""
    calm_thread_pools()
    from .merge_adapter import main

    return main(argv)


def extractor_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora-extractor``."""
    calm_thread_pools()
    from .lora_extractor import main

    return main(argv)


def merger_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora-merger``."""
    calm_thread_pools()
    from .lora_merger import main

    return main(argv)
