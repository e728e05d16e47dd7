"""PEFT OFT (orthogonal fine-tuning, the ``oft_R`` layout of PEFT >= 0.16): W' = W @ R^T, R block diagonal.

Each saved ``oft_R.weight`` row holds the upper triangle of one skew-symmetric block Q (``oft_block_size`` x
``oft_block_size``); the block's rotation is a Cayley transform of Q: exact, (I - Q)(I + Q)^-1, or PEFT's
truncated Neumann series of (I + Q)(I - Q)^-1 (``use_cayley_neumann``, ``num_cayley_neumann_terms``: the
transpose of the exact one, as PEFT has it), after PEFT's COFT projection when ``coft`` is set. ``block_share``:
one block repeated along the diagonal. PEFT merges a Linear or Conv2d weight (viewed as ``(out, in * k * k)``)
as W @ R^T and an embedding (``oft_embedding_R``, rotating its output vectors) as W @ R; biases are not touched.
The block sizes come from the saved shapes: PEFT adjusts ``r``/``oft_block_size`` per layer, so the config's
values need not match a layer. PEFT 0.18 changed the Neumann series (and began saving ``peft_version``); an
adapter that may predate it is refused rather than merged with a series it was not trained with (PEFT itself
only warns).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arrays import F32
from ..edits import Array, BlockOps, TargetedEdit, TensorRef
from ..errors import AdapterError
from ..peft_flags import CONFIG_NAME
from .orthogonal import InputTransform, cayley, module_slot, multiply_block_diagonal, raw_count, raw_flag, raw_number
from .registry import Tuner, TunerInput, register_tuner

# oft_r, oft_s: the tensors of PEFT <= 0.15.2's OFT, whose layout PEFT no longer loads (claimed to name it).
OLD_PARAMS = ("oft_r", "oft_s")
OFT_PARAMS = ("oft_R", "oft_embedding_R", *OLD_PARAMS)
NEUMANN_SINCE = (0, 18)  # PEFT changed the Cayley-Neumann series in 0.18.0 (and started saving peft_version)


def skew_symmetric(vec: np.ndarray, size: int) -> np.ndarray:
    """(k, size, size) skew-symmetric matrices whose upper triangles (row by row) are the rows of ``vec``."""
    rows, cols = np.triu_indices(size, 1)
    out = np.zeros((vec.shape[0], size, size), dtype=F32)
    out[:, rows, cols] = vec
    return out - out.swapaxes(1, 2)


def coft_projection(vec: np.ndarray, size: int, eps: float) -> np.ndarray:
    """PEFT's COFT constraint: each block's skew matrix is shrunk to Frobenius norm eps / sqrt(blocks) when larger."""
    limit = np.float32(eps / math.sqrt(vec.shape[0]))
    norms = np.linalg.norm(skew_symmetric(vec, size), axis=(1, 2)).astype(F32).reshape(-1, 1)
    far = (norms > limit).reshape(-1)
    out = vec.copy()
    out[far] = limit * (vec[far] / norms[far])
    return out


def neumann_series(q: np.ndarray, terms: int) -> np.ndarray:
    """PEFT's truncated Neumann series of (I + Q)(I - Q)^-1 ~ I + 2Q + 2Q^2 + ... + Q^(terms-1).

    Term for term as PEFT (>= 0.18) sums it: 2 Q^k up to the second-last term, the last one once, and at least
    I + 2Q + 2Q^2 + Q^3 once there are more than two terms.
    """
    out = np.broadcast_to(np.eye(q.shape[-1], dtype=F32), q.shape).copy()
    if terms <= 1:
        return out
    out += 2 * q
    if terms <= 2:
        return out
    power = q @ q
    out += 2 * power
    for _ in range(3, terms - 1):
        power = power @ q
        out += 2 * power
    out += power @ q
    return out


@dataclass(frozen=True)
class OftRotation(InputTransform):
    """W' = W @ R^T (Linear, Conv2d) or W @ R (``embedding``): R = block_diag of the Cayley rotations of ``R``'s
    rows (one row, repeated, with ``block_share``). ``neumann_terms`` None: the exact Cayley transform."""

    R: TensorRef
    block_size: int
    embedding: bool = False
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5
    neumann_terms: int | None = 5

    tuner = "OFT"
    layers = "Linear, Conv2d and Embedding"

    def refs(self) -> list[TensorRef]:
        return [self.R]

    def rotations(self) -> np.ndarray:
        """The (k, block, block) rotation blocks of R, in fp32 as PEFT computes them."""
        vec = np.asarray(self.R.load(), dtype=F32).reshape(self.R.shape[0], -1)
        if self.coft:
            vec = coft_projection(vec, self.block_size, self.eps)
        q = skew_symmetric(vec, self.block_size)
        if self.neumann_terms is None:
            return cayley(q)
        return neumann_series(q, self.neumann_terms)

    def transform(self, block: Array, rows: slice, ops: BlockOps) -> None:
        def make() -> Array:
            blocks = self.rotations()
            return ops.array(np.ascontiguousarray(blocks if self.embedding else blocks.swapaxes(1, 2)))

        multiply_block_diagonal(block, ops.cached(self, "blocks", make))

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        inputs = math.prod(shape[1:]) if len(shape) > 1 else 0
        if self.block_share:
            if inputs % self.block_size:
                return f"OFT's shared {self.block_size} x {self.block_size} block does not divide {inputs} inputs"
            size = inputs
        else:
            size = self.R.shape[0] * self.block_size
        return self.input_size_error(shape, size, (2,) if self.embedding else (2, 4))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "oft",
            "blocks": self.R.shape[0],
            "block_size": self.block_size,
            "block_share": self.block_share,
            "coft": self.coft,
            "cayley": "exact" if self.neumann_terms is None else f"neumann-{self.neumann_terms}",
            "layer": "embedding" if self.embedding else "linear/conv2d",
            "strength": self.strength,
        }

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not np.asarray(load(self.R)).any()  # Q = 0: every rotation is exactly I


@dataclass(frozen=True)
class OftSettings:
    """The config keys that change OFT's merge, checked."""

    coft: bool
    eps: float
    block_share: bool
    neumann_terms: int | None


def _version(text: Any, source: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text) if isinstance(text, str) else None
    if match is None:
        raise AdapterError(f"{source}: peft_version {text!r} is not a PEFT version: fix it in {CONFIG_NAME}")
    return int(match[1]), int(match[2])


def oft_settings(raw: dict[str, Any], source: str) -> OftSettings:
    """OFT's config keys, each checked; configs PEFT itself no longer merges the same way are refused."""
    if "oft_block_size" not in raw:  # PEFT's own test for an adapter of the OFT before 0.14
        raise AdapterError(
            f"{source}: this OFT adapter predates PEFT 0.14 (no oft_block_size); PEFT no longer loads it: merge it "
            "with PEFT 0.13 or retrain it"
        )
    r, block = raw_count(raw, "r", 0, source), raw_count(raw, "oft_block_size", 32, source)
    if (r == 0) == (block == 0):
        raise AdapterError(f"{source}: OFT needs exactly one of r ({r}) and oft_block_size ({block}) non-zero")
    neumann = raw_flag(raw, "use_cayley_neumann", True, source)
    terms = raw_count(raw, "num_cayley_neumann_terms", 5, source)
    version = raw.get("peft_version")  # saved since PEFT 0.18: its absence means 0.16 or 0.17 (or a hand edit)
    if neumann and version is None:
        raise AdapterError(
            f"{source}: no peft_version, so the adapter may come from PEFT 0.16 or 0.17, whose Cayley-Neumann series "
            "PEFT changed in 0.18.0: merge it with the PEFT version that trained it, or add that version as "
            "peft_version if it is 0.18 or later"
        )
    if neumann and _version(version, source) < NEUMANN_SINCE:
        raise AdapterError(
            f"{source}: trained with PEFT {version}, whose Cayley-Neumann series PEFT changed in 0.18.0; merge it "
            "with the PEFT version it was trained with, or retrain it"
        )
    eps = raw_number(raw, "eps", 6e-5, source)
    return OftSettings(
        coft=raw_flag(raw, "coft", False, source),
        eps=eps,
        block_share=raw_flag(raw, "block_share", False, source),
        neumann_terms=terms if neumann else None,
    )


def block_size_of(elements: int) -> int | None:
    """The block size b with b (b - 1) / 2 == ``elements`` (the upper triangle PEFT saves), or None."""
    size = (1 + math.isqrt(1 + 8 * elements)) // 2
    return size if size * (size - 1) // 2 == elements else None


def module_edit(module: str, slots: dict[str, str], settings: OftSettings, tuner_input: TunerInput) -> TargetedEdit:
    """The OFT edit of one module."""
    source = tuner_input.source
    old = [slots[slot] for slot in OLD_PARAMS if slot in slots]
    if old:
        raise AdapterError(
            f"{source}: {old[0]!r} is an OFT tensor of PEFT <= 0.15.2, whose layout PEFT no longer loads; merge it "
            "with PEFT 0.15.2 or retrain it"
        )
    embedding = "oft_embedding_R" in slots
    (key,) = module_slot(module, slots, ("oft_embedding_R",) if embedding else ("oft_R",), "OFT", source)
    ref = TensorRef(tuner_input.checkpoint, key)
    size = block_size_of(ref.shape[1]) if len(ref.shape) == 2 else None
    if size is None or ref.shape[0] == 0:
        raise AdapterError(
            f"{source}: {key!r} has shape {ref.shape}, not OFT blocks (rows of b (b - 1) / 2 values); the adapter "
            "file is broken"
        )
    if settings.block_share and ref.shape[0] != 1:
        raise AdapterError(
            f"{source}: block_share is true in {CONFIG_NAME} but {key!r} holds {ref.shape[0]} blocks; fix the config"
        )
    edit = OftRotation(
        ref,
        size,
        embedding=embedding,
        block_share=settings.block_share,
        coft=settings.coft,
        eps=settings.eps,
        neumann_terms=settings.neumann_terms,
        adapter=tuner_input.label,
        source_key=key,
    )
    return TargetedEdit(f"{module}.weight", edit)


def read_oft(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every OFT module's edit, and module -> its number of rotation blocks."""
    settings = oft_settings(tuner_input.config.raw, tuner_input.source)
    edits = [module_edit(m, slots, settings, tuner_input) for m, slots in tuner_input.modules.items()]
    return edits, {e.target.removesuffix(".weight"): e.edit.R.shape[0] for e in edits}  # type: ignore[attr-defined]


TUNER = register_tuner(
    Tuner(
        "OFT",
        OFT_PARAMS,
        read_oft,
        description="OFT, COFT, block sharing (W' = W R^T, an embedding W R; R block-diagonal Cayley rotations)",
        extra={"layers": ("linear", "conv2d", "embedding")},
    )
)
