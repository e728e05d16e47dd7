"""Hugging Face Hub sources: ``huggingface_hub.snapshot_download`` of only the files a merge needs.

``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens (``HF_TOKEN``, ``hf auth login``) are left to
huggingface_hub, which reads them itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..errors import SourceError

log = logging.getLogger("lorafuse")

# What a merged model folder needs: config, weights, tokenizer, chat template, custom code.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
# Files that match the patterns above (or the .bin fallback) but no merge reads.
IGNORE_PATTERNS = ["consolidated*", "original/*", "optimizer*", "training_args.bin", "scheduler*", "rng_state*"]
ADAPTER_PATTERNS = ["*.json", "*.safetensors"]
BIN_PATTERNS = ["*.bin"]


def patterns_for(role: str, subfolder: str | None) -> tuple[list[str], list[str]]:
    """(first-pass patterns, .bin fallback patterns) for a ``"model"`` or ``"adapter"`` download."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    first = MODEL_PATTERNS if role == "model" else ADAPTER_PATTERNS
    return [prefix + p for p in first], [prefix + p for p in BIN_PATTERNS]


def has_safetensors(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("*.safetensors"))


def download_in_two_passes(
    fetch: Callable[[list[str]], Path], first: list[str], fallback: list[str], subfolder: str | None
) -> Path:
    """Fetch ``first`` patterns; only when that brought no safetensors weights, fetch the ``.bin`` files too.

    Repos often ship both formats; this way the (larger, pickled) ``.bin`` copies are downloaded only when needed.
    """
    root = fetch(first)
    if not has_safetensors(root / subfolder if subfolder else root):
        root = fetch(first + fallback)
    return root


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def hf_snapshot(
    repo_id: str, revision: str | None, cache_dir: str | Path | None, role: str, subfolder: str | None = None
) -> Path:
    """Download (or find in the cache) ``repo_id`` at ``revision``; returns the snapshot folder."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise SourceError(
            f"hf://{repo_id} needs huggingface_hub, which is not installed: pip install 'lorafuse[hub]'"
        ) from exc
    first, fallback = patterns_for(role, subfolder)

    def fetch(patterns: list[str]) -> Path:
        try:
            path = huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir else None,
                allow_patterns=patterns,
                ignore_patterns=IGNORE_PATTERNS,
            )
        except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, auth, not found)
            raise SourceError(_hub_message(repo_id, revision, exc)) from exc
        return Path(path)

    log.info("downloading hf://%s%s (only the files a merge needs)", repo_id, f"@{revision}" if revision else "")
    return download_in_two_passes(fetch, first, fallback, subfolder)


def _hub_message(repo_id: str, revision: str | None, exc: Exception) -> str:
    name = type(exc).__name__
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "IncompleteSnapshotError"):
        fix = "it is not (completely) in the Hugging Face cache and the Hub cannot be used (HF_HUB_OFFLINE=1 or no "
        fix += "network): download it once online, or point HF_HOME / --cache-dir at the cache that holds it"
    elif name in ("RepositoryNotFoundError", "GatedRepoError"):
        fix = "check the name, and for private or gated repos log in (hf auth login) or set HF_TOKEN"
    elif name == "RevisionNotFoundError":
        fix = "check the branch, tag or commit after '@'"
    else:
        fix = "check the name and your network"
    return f"cannot get {where} from the Hugging Face Hub ({_one_line(exc)}): {fix}"
