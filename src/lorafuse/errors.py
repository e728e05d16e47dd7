"""User-facing errors. Each names the file or key at fault and the fix; the CLI prints one line."""

from __future__ import annotations


class LorafuseError(Exception):
    """Base class for every error lorafuse reports to a user (CLI exit code 1)."""


class InputError(LorafuseError):
    """An input file or folder is missing, unreadable, truncated, corrupt or a Git LFS pointer."""


class AdapterError(LorafuseError):
    """An adapter is malformed, or holds something lorafuse does not support."""


class ShapeMismatchError(LorafuseError):
    """An adapter tensor does not fit the base tensor it targets (usually the wrong base model)."""


class NonFiniteError(LorafuseError):
    """NaN or Inf in an adapter or in a merged tensor."""


class DtypeOverflowError(LorafuseError):
    """A merged value does not fit the output dtype (e.g. fp16 range)."""


class OutputError(LorafuseError):
    """The output location cannot be used (exists and not empty without --overwrite, ...)."""


class SourceError(LorafuseError):
    """A model or adapter source (Hub, ModelScope, git) could not be resolved to local files."""


class VerificationError(LorafuseError):
    """A merged model differs from base + adapters beyond tolerance."""
