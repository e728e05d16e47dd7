"""PEFT HRA (Householder reflection adaptation): W' = W @ H, H a product of r Householder reflections.

``hra_u`` is (in, r) for a Linear weight, (in * k * k, r) for a Conv2d one (viewed as ``(out, in * k * k)``).
Without ``apply_GS``, H = (I - 2 u_0 u_0^T) ... (I - 2 u_{r-1} u_{r-1}^T) with each u_i normalised; with it,
the u_i are first made orthonormal by Gram-Schmidt (in PEFT's order) and H = I - 2 Q Q^T. Either way
H = I - U T U^T (the compact WY form of a product of reflections, T r x r), so a block of rows changes by
-(W U) (T U^T): two rank-r products, never the in x in matrix. Biases are not touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arrays import F32
from ..edits import Array, BlockOps, TargetedEdit, TensorRef
from ..errors import AdapterError
from ..peft_flags import CONFIG_NAME, positive_int
from .orthogonal import InputTransform, module_slot, raw_flag
from .registry import Tuner, TunerInput, register_tuner

HRA_PARAMS = ("hra_u",)


def gram_schmidt(u: np.ndarray) -> np.ndarray:
    """The columns of ``u`` made orthonormal one after another, as PEFT does (each against the finished ones)."""
    done: list[np.ndarray] = []
    for i in range(u.shape[1]):
        column = u[:, i : i + 1]
        for previous in done:
            column = column - (previous.T @ column) * previous
        done.append(column / np.linalg.norm(column))
    return np.concatenate(done, axis=1)


def reflection_factors(u: np.ndarray) -> np.ndarray:
    """T with (I - 2 u_0 u_0^T) ... (I - 2 u_k u_k^T) = I - U T U^T for unit columns u_i of U (upper triangular).

    Adding a reflection on the right: (I - U T U^T)(I - 2 u u^T) = I - [U u] [[T, -2 T U^T u], [0, 2]] [U u]^T.
    """
    rank = u.shape[1]
    t = np.zeros((rank, rank), dtype=F32)
    for k in range(rank):
        t[:k, k] = -2 * (t[:k, :k] @ (u[:, :k].T @ u[:, k]))
        t[k, k] = 2
    return t


@dataclass(frozen=True)
class HraReflection(InputTransform):
    """W' = W @ H = W - (W U)(T U^T) (see the module docstring)."""

    U: TensorRef
    apply_gs: bool = False

    tuner = "HRA"

    def refs(self) -> list[TensorRef]:
        return [self.U]

    def low_rank(self) -> tuple[np.ndarray, np.ndarray]:
        """(U, V) in fp32 with H = I - U @ V."""
        u = np.asarray(self.U.load(), dtype=F32).reshape(self.U.shape[0], -1)
        norms = np.linalg.norm(u, axis=0)
        if not norms.all():
            raise AdapterError(
                f"{self.U.file}: column {int(np.argmin(norms))} of {self.U.name!r} is zero: no Householder "
                "reflection (PEFT's merge would give NaN); the adapter is broken"
            )
        if self.apply_gs:
            q = gram_schmidt(u)
            return q, np.ascontiguousarray(np.float32(2) * q.T)
        unit = u / norms
        return unit, np.ascontiguousarray(reflection_factors(unit) @ unit.T)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        """block -= strength * (block @ U) @ V: linear in the block, so no copy of it."""
        u, v = ops.cached(self, "factors", lambda: tuple(ops.array(f) for f in self.low_rank()))
        delta = ops.product(block @ u, v)
        if self.strength != 1.0:
            delta *= np.float32(self.strength)
        block -= delta

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        return self.input_size_error(shape, self.U.shape[0])

    def describe(self) -> dict[str, Any]:
        return {"kind": "hra", "reflections": self.U.shape[1], "apply_GS": self.apply_gs, "strength": self.strength}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        """PEFT's initial HRA: pairs of equal vectors, whose two reflections cancel (not with Gram-Schmidt)."""
        u = np.asarray(load(self.U)).reshape(self.U.shape[0], -1)
        return not self.apply_gs and u.shape[1] % 2 == 0 and bool((u[:, 0::2] == u[:, 1::2]).all())


def module_edit(module: str, slots: dict[str, str], rank: int, gs: bool, tuner_input: TunerInput) -> TargetedEdit:
    """The HRA edit of one module."""
    source = tuner_input.source
    (key,) = module_slot(module, slots, HRA_PARAMS, "HRA", source)
    ref = TensorRef(tuner_input.checkpoint, key)
    if len(ref.shape) != 2 or 0 in ref.shape:
        raise AdapterError(f"{source}: {key!r} has shape {ref.shape}, not HRA vectors (in, r); the file is broken")
    if ref.shape[1] != rank:
        raise AdapterError(
            f"{source}: {key!r} holds {ref.shape[1]} vectors but r is {rank} in {CONFIG_NAME}; PEFT loads only "
            "a matching pair: fix r"
        )
    return TargetedEdit(f"{module}.weight", HraReflection(ref, gs, adapter=tuner_input.label, source_key=key))


def read_hra(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every HRA module's edit, and module -> r."""
    raw, source = tuner_input.config.raw, tuner_input.source
    rank = positive_int(raw.get("r", 8), f"{source}: r", "set it to the number of HRA vectors (columns of hra_u)")
    gs = raw_flag(raw, "apply_GS", False, source)
    edits = [module_edit(m, slots, rank, gs, tuner_input) for m, slots in tuner_input.modules.items()]
    return edits, {e.target.removesuffix(".weight"): rank for e in edits}


TUNER = register_tuner(
    Tuner(
        "HRA",
        HRA_PARAMS,
        read_hra,
        description="HRA, with or without apply_GS (W' = W H, H a product of Householder reflections)",
        extra={"layers": ("linear", "conv2d")},
    )
)
