"""Where model and adapter files come from: local paths, the Hugging Face Hub, ModelScope, git (+ Git LFS).

Every source resolves to a local folder; the rest of lorafuse only ever reads local files.

- ``resolve_model(text, revision=..., cache_dir=...)``: a base model folder.
- ``resolve_adapter(text, ref=..., subfolder=..., config=...)``: an adapter folder (with an adapter_config.json
  taken from ``config`` / ``ADAPTER_CONFIG_JSON`` / ``ADAPTER_CONFIG_PATH`` when the adapter has none).
- ``resolve_merge_inputs(base, adapters, ...)``: both for one merge, the base read from the adapter when omitted.
"""

from __future__ import annotations

from .inputs import LazyWorkDir, MergeInputs, resolve_merge_inputs
from .resolve import Resolved, fetch, fetch_adapter, resolve_adapter, resolve_model
from .spec import Source, parse_source

__all__ = [
    "LazyWorkDir",
    "MergeInputs",
    "Resolved",
    "Source",
    "fetch",
    "fetch_adapter",
    "parse_source",
    "resolve_adapter",
    "resolve_merge_inputs",
    "resolve_model",
]
