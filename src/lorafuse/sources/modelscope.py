"""ModelScope sources: ``modelscope.snapshot_download(model_id, cache_dir=..., revision=...)``."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from ..errors import SourceError
from .hub import IGNORE_PATTERNS, _one_line, download_in_two_passes, patterns_for

log = logging.getLogger("lorafuse")


def ms_snapshot(
    model_id: str, revision: str | None, cache_dir: str | Path | None, role: str, subfolder: str | None = None
) -> Path:
    """Download (or find in ModelScope's cache) ``model_id`` at ``revision``; returns the local folder."""
    try:
        import modelscope
    except ImportError as exc:
        raise SourceError(
            f"ms://{model_id} needs the modelscope package, which is not installed: pip install 'lorafuse[modelscope]'"
        ) from exc
    download = modelscope.snapshot_download
    try:
        params = inspect.signature(download).parameters
    except (TypeError, ValueError):
        params = {}
    first, fallback = patterns_for(role, subfolder)

    def fetch(patterns: list[str]) -> Path:
        kwargs = {}
        # Older modelscope releases have no pattern filters; they then download the whole repo.
        if "allow_patterns" in params:
            kwargs = {"allow_patterns": patterns, "ignore_patterns": IGNORE_PATTERNS}
        try:
            path = download(
                model_id, cache_dir=str(cache_dir) if cache_dir else None, revision=revision or None, **kwargs
            )
        except Exception as exc:  # modelscope raises HTTP, auth and not-found errors of several types
            where = f"ms://{model_id}" + (f"@{revision}" if revision else "")
            raise SourceError(
                f"cannot get {where} from ModelScope ({_one_line(exc)}): check the model id, the revision "
                "(ModelScope's default branch is 'master') and your network or MODELSCOPE_API_TOKEN"
            ) from exc
        return Path(path)

    log.info("downloading ms://%s%s", model_id, f"@{revision}" if revision else "")
    return download_in_two_passes(fetch, first, fallback, subfolder)
