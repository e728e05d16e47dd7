"""The LyCORIS algorithms in kohya-style files (``<module>.<tensor>``, ``lora_unet_``/``lycoris_`` names), as the
trained LyCORIS modules compute them (lycoris-lora's ``forward``; ComfyUI applies the same):

- LoCon with ``lora_mid`` (Tucker, "CP"): W += alpha/r * up @ (mid x down), a conv LoRA whose down factor is
  ``mid`` contracted with ``lora_down`` (:class:`TuckerDown`);
- LoHa (``hada_w1_a/b``, ``hada_w2_a/b``, optional ``hada_t1/t2``): W += alpha/r * (M1 * M2), r the rows of
  ``hada_w1_b``;
- LoKr (``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` with optional ``lokr_t2``): W += alpha/r *
  kron(M1, M2), r the rank of a factor stored in parts; with both stored whole the scale is 1;
- DoRA (``dora_scale`` beside any of them, LyCORIS' weight decomposition, :class:`WeightDecomposed`);
- GLoRA (``a1``/``a2``/``b1``/``b2``): W += alpha/r * (W @ a1 @ a2 + b1 @ b2), the first term on the input channels
  (:class:`GloraDelta`);
- OFT ("diag-oft", ``oft_blocks`` (k, b, b)) and BOFT (``oft_blocks`` (m, k, b, b)), optional ``rescale``:
  rotations of the output rows, W' = rescale * (R^T W) (:class:`OutputRotation`);
- ``w_norm``/``b_norm`` (trained norm layers): added to ``.weight``/``.bias`` like ``diff``/``diff_b``.

Its IA3 (``on_input``) and T-LoRA (``lambda_layer``) are refused with one line.

The Hadamard and Kronecker updates are :mod:`lorafuse.tuners.lycoris_math`'s (PEFT's LoHa/LoKr store the same
factors). lycoris-lora's own ``merge_to`` multiplies LoHa and LoKr updates by alpha/r twice (its ``get_weight``
already holds the scale); lorafuse merges what the trained model computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..arrays import F32
from ..edits import Array, BlockOps, Edit, LoraDelta, TensorRef
from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..peft_flags import finite_number
from ..tuners.boft import butterfly_order
from ..tuners.lokr import kronecker
from ..tuners.lycoris_math import Factor, HadamardDelta, KroneckerDelta
from ..tuners.orthogonal import cayley, multiply_block_diagonal

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
GLORA = ("a1", "a2", "b1", "b2")
OFT = ("oft_blocks", "rescale")
ALGORITHM_SLOTS = {"loha": LOHA, "lokr": LOKR, "glora": GLORA, "oft": OFT}
# Key suffix -> slot, for the formats that read LyCORIS files (kohya, diffusion).
SUFFIXES = (
    {f".{name}": name for name in (*LOHA, *LOKR)}
    | {f".{name}.weight": name for name in GLORA}
    | {f".{name}": name for name in OFT}
    | {
        ".lora_mid.weight": "mid",
        ".dora_scale": "dora_scale",
        ".w_norm": "w_norm",
        ".b_norm": "b_norm",
    }
)
# LyCORIS tensors of algorithms lorafuse does not merge -> the algorithm, for a one-line refusal.
UNSUPPORTED = {
    ".bm.weight": "GLoRA with a Tucker core",
    ".on_input": "IA3",
    ".lambda_layer": "T-LoRA",
}
# Norm-layer slots -> the base tensor they are added to.
NORM_TARGETS = {"w_norm": "weight", "b_norm": "bias"}
EPS = float(np.finfo(np.float32).eps)  # LyCORIS adds it to the weight norm


def algorithm_of(slots: Mapping[str, str]) -> str | None:
    """``"loha"``, ``"lokr"``, ``"glora"`` or ``"oft"`` for a module with that algorithm's tensors; else None."""
    return next((algorithm for algorithm, names in ALGORITHM_SLOTS.items() if any(s in slots for s in names)), None)


def unsupported_error(key: str, source: str) -> AdapterError | None:
    """The refusal of a tensor of a LyCORIS algorithm lorafuse does not merge; None for other names."""
    algorithm = next((a for suffix, a in UNSUPPORTED.items() if key.endswith(suffix)), None)
    if algorithm is None:
        return None
    return AdapterError(
        f"{source}: {key!r} is a LyCORIS {algorithm} tensor, which lorafuse does not merge: merge it with "
        "lycoris-lora's tools/merge.py"
    )


@dataclass(frozen=True)
class TuckerDown(TensorRef):
    """The down factor of a Tucker LoCon, ``D[m, j, *k] = sum_n mid[m, n, *k] down[n, j]``: ``lora_mid`` (r, r,
    *kernel) contracted with ``lora_down`` (r, in, 1, 1), computed when loaded (the name is ``lora_mid``'s)."""

    down: TensorRef | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        mid, down = self.checkpoint.infos[self.name].shape, self.down.shape
        return (mid[0], down[1], *mid[2:])

    def load(self) -> np.ndarray:
        mid = super().load()
        down = self.down.load().reshape(self.down.shape[0], self.down.shape[1])
        return np.ascontiguousarray(np.moveaxis(np.tensordot(mid, down, axes=([1], [0])), -1, 1), dtype=F32)

    def load_span(self, start: int, stop: int) -> np.ndarray:
        return self.load().reshape(-1)[start:stop]

    def error(self) -> str | None:
        mid, down = self.checkpoint.infos[self.name].shape, self.down.shape
        if len(mid) < 3 or len(down) < 2 or mid[1] != down[0] or any(d != 1 for d in down[2:]):
            return f"lora_mid {self.name!r} {tuple(mid)} and lora_down {tuple(down)} are no Tucker pair"
        return None


def tucker_locon(
    checkpoint: Checkpoint, slots: Mapping[str, str], scale: float, label: str, source: str, module: str
) -> LoraDelta:
    """LoCon with ``lora_mid``: a conv LoRA ``up (out, r, 1, 1) @ D (r, in, *kernel)``."""
    down = TuckerDown(checkpoint, slots["mid"], down=TensorRef(checkpoint, slots["down"]))
    up = TensorRef(checkpoint, slots["up"])
    err = down.error() or (
        None if up.shape[1] == down.shape[0] else f"lora_up {up.shape} does not fit rank {down.shape[0]}"
    )
    if err:
        raise AdapterError(f"{source}: module {module!r}: {err}; the adapter file is broken")
    return LoraDelta(down, up, scale, "conv", adapter=label, source_key=slots["up"])


def loha(
    checkpoint: Checkpoint, slots: Mapping[str, str], alpha_scale: Callable[[int], float], label: str, source: str
) -> HadamardDelta:
    """LoHa: alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b), each factor optionally a Tucker product with its core."""
    ref = _refs(checkpoint, slots, source, LOHA, required=LOHA[:4])
    if ("hada_t1" in ref) != ("hada_t2" in ref):
        raise AdapterError(f"{source}: {slots['hada_w1_a']!r}: one Tucker core (hada_t1/hada_t2) without the other")
    first = Factor(up=ref["hada_w1_a"], down=ref["hada_w1_b"], core=ref.get("hada_t1"))
    second = Factor(up=ref["hada_w2_a"], down=ref["hada_w2_b"], core=ref.get("hada_t2"))
    rank = ref["hada_w1_b"].shape[0]
    for factor in (first, second):
        err = factor.error()
        if err:
            raise AdapterError(f"{source}: {slots['hada_w1_a']!r}: {err}; the adapter file is broken")
    return HadamardDelta(
        first.up,
        first.down,
        second.up,
        second.down,
        scale=alpha_scale(rank),
        rank=rank,
        core1=first.core,
        core2=second.core,
        adapter=label,
        source_key=slots["hada_w1_a"],
    )


def lokr(
    checkpoint: Checkpoint, slots: Mapping[str, str], alpha_scale: Callable[[int], float], label: str, source: str
) -> KroneckerDelta:
    """LoKr: alpha/r * kron(M1, M2); scale 1 when both factors are stored whole (LyCORIS' full-matrix mode)."""
    ref = _refs(checkpoint, slots, source, LOKR)
    key = slots.get("lokr_w1") or slots.get("lokr_w1_a") or next(iter(slots.values()))
    factors = []
    for i in (1, 2):
        whole, up, down = ref.get(f"lokr_w{i}"), ref.get(f"lokr_w{i}_a"), ref.get(f"lokr_w{i}_b")
        core = ref.get("lokr_t2") if i == 2 else None
        if (whole is None) == (up is None and down is None) or (whole is None and (up is None or down is None)):
            raise AdapterError(
                f"{source}: {key!r}: LoKr factor {i} needs lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b; the "
                "adapter file is broken"
            )
        factor = Factor(whole=whole, up=up, down=down, core=core)
        err = factor.error()
        if err:
            raise AdapterError(f"{source}: {key!r}: {err}; the adapter file is broken")
        factors.append(factor)
    first, second = factors
    ranks = [f.down.shape[0] for f in factors if f.down is not None]
    if len(set(ranks)) > 1:
        raise AdapterError(f"{source}: {key!r}: the LoKr factors have ranks {ranks}; the adapter file is broken")
    rank = ranks[0] if ranks else 0
    return kronecker(first, second, alpha_scale(rank) if ranks else 1.0, rank, label, key)


def glora(
    checkpoint: Checkpoint, slots: Mapping[str, str], alpha_scale: Callable[[int], float], label: str, source: str
) -> GloraDelta:
    """GLoRA: alpha/r * (W @ a1 @ a2 + b1 @ b2), r the rows of ``a2``."""
    ref = _refs(checkpoint, slots, source, GLORA, required=GLORA)
    a1, a2, b1, b2 = (ref[n] for n in GLORA)
    rank = a2.shape[0]
    inner = a1.shape[0]
    if a1.shape[1] != rank or a2.shape[1] != inner or b1.shape[1] != rank or b2.shape[0] != rank:
        shapes = ", ".join(f"{n} {tuple(r.shape)}" for n, r in zip(GLORA, (a1, a2, b1, b2), strict=True))
        raise AdapterError(f"{source}: {slots['a1']!r}: {shapes} are no GLoRA module; the adapter file is broken")
    return GloraDelta(a1, a2, b1, b2, alpha_scale(rank), adapter=label, source_key=slots["a1"])


def oft(checkpoint: Checkpoint, slots: Mapping[str, str], label: str, source: str) -> OutputRotation:
    """OFT/BOFT: ``oft_blocks`` (3-D: diag-oft, 4-D: BOFT), optional ``rescale``, ``alpha`` the norm constraint."""
    key = slots["oft_blocks"] if "oft_blocks" in slots else next(iter(slots.values()))
    extra = sorted(set(slots) - {*OFT, "alpha"})
    if extra or "oft_blocks" not in slots:
        what = f"holds {slots[extra[0]]!r} beside its OFT tensors" if extra else "has a rescale but no oft_blocks"
        raise AdapterError(f"{source}: LyCORIS module {key!r} {what}, which LyCORIS never writes; the file is broken")
    if "alpha" not in slots:  # LyCORIS always saves it; 0 is its "no constraint"
        raise AdapterError(
            f"{source}: {key!r} has no alpha (the OFT norm constraint) beside it; the file is incomplete"
        )
    blocks = TensorRef(checkpoint, key)
    shape = tuple(blocks.shape)
    if len(shape) not in (3, 4) or shape[-1] != shape[-2] or 0 in shape:
        raise AdapterError(
            f"{source}: {key!r} has shape {shape}, not LyCORIS OFT blocks (k, b, b) or BOFT blocks (m, k, b, b); "
            "the file is broken"
        )
    alpha = TensorRef(checkpoint, slots["alpha"]).load()
    if alpha.size != 1:
        raise AdapterError(f"{source}: {slots['alpha']!r} must hold one number, it has shape {tuple(alpha.shape)}")
    constraint = finite_number(
        float(alpha.reshape(())), f"{source}: {slots['alpha']!r}", "the file is broken", AdapterError
    )
    if constraint < 0:
        raise AdapterError(f"{source}: {slots['alpha']!r} is {constraint:g}: an OFT norm constraint is at least 0")
    rescale = TensorRef(checkpoint, slots["rescale"]) if "rescale" in slots else None
    return OutputRotation(blocks, rescale, constraint, adapter=label, source_key=key)


def _refs(
    checkpoint: Checkpoint,
    slots: Mapping[str, str],
    source: str,
    names: tuple[str, ...],
    required: tuple[str, ...] = (),
) -> dict[str, TensorRef]:
    missing = [n for n in required if n not in slots]
    if missing:
        first = next(iter(slots.values()))
        raise AdapterError(f"{source}: {first!r} has no {missing[0]} beside it; the adapter file is incomplete")
    return {n: TensorRef(checkpoint, slots[n]) for n in names if n in slots}


@dataclass(frozen=True)
class WeightDecomposed(Edit):
    """LyCORIS' DoRA: W' = (W + dW) * m / (||W + dW|| + eps), the norm per output row (``dora_scale`` (out, 1, ...))
    or per input channel over the rows and kernel (``dora_scale`` (1, in, ...)), as the shape of ``dora_scale``
    says. ``dW`` is the ``inner`` update at full strength; a strength s mixes the factor, not dW (LyCORIS'
    multiplier): W' = (W + dW) * (s * (m / ||W + dW|| - 1) + 1).
    """

    inner: Edit
    magnitude: TensorRef
    strength: float = 1.0
    shape: tuple[int, ...] = ()  # the target's, set by :meth:`oriented`

    def refs(self) -> list[TensorRef]:
        return [*self.inner.refs(), self.magnitude]

    @property
    def on_rows(self) -> bool:
        mag = tuple(self.magnitude.shape)
        return bool(self.shape) and mag[0] == self.shape[0] and math.prod(mag) == self.shape[0]

    @property
    def whole_tensor(self) -> bool:
        return not self.on_rows or self.inner.whole_tensor

    @property
    def needs_base(self) -> bool:
        return True

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        return replace(self, inner=self.inner.oriented(shape, conv1d), shape=tuple(shape))

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        err = self.inner.shape_error(shape)
        if err:
            return err
        mag = tuple(self.magnitude.shape)
        rows = mag[0] == shape[0] and math.prod(mag) == shape[0]
        columns = len(shape) >= 2 and len(mag) >= 2 and mag[0] == 1 and mag[1] == shape[1] == math.prod(mag)
        if rows == columns:
            return (
                f"dora_scale {mag} is neither one value per output row nor one per input channel of {tuple(shape)}"
                + (" (it could be either)" if rows else "")
            )
        return None

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        delta = block * 0
        self.inner.apply(delta, rows, ops)
        merged = (block if base is None else base) + delta
        magnitude = ops.cached(self, "magnitude", lambda: ops.load(self.magnitude).reshape(-1))
        if self.on_rows:
            factor = magnitude[rows].reshape(-1, 1) / (ops.norm(merged, axis=1) + EPS)
        else:  # per input channel: its columns (one per kernel position) across every row
            channels = self.shape[1]
            squares = (ops.norm(merged, axis=0) ** 2).reshape(channels, -1).sum(-1)
            per_channel = magnitude / (squares**0.5 + EPS)
            factor = (per_channel.reshape(channels, 1) + delta[:1].reshape(channels, -1) * 0).reshape(1, -1)
        if self.strength != 1.0:
            factor = (factor - 1) * self.strength + 1
        block += delta
        block *= factor

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, strength=self._times(self.strength, strength))

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "dora": True}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return False  # the magnitudes rescale the weight even where the update is zero


@dataclass(frozen=True)
class GloraDelta(Edit):
    """GLoRA: W += scale * (W @ A + b1 @ b2), ``A = a1 @ a2`` (in, in) mixing W's input channels (at each kernel
    position of a conv), W the tensor before the adapter's other edits; ``b1 @ b2`` a (conv) LoRA."""

    a1: TensorRef
    a2: TensorRef
    b1: TensorRef
    b2: TensorRef
    scale: float

    def refs(self) -> list[TensorRef]:
        return [self.a1, self.a2, self.b1, self.b2]

    @property
    def rank(self) -> int:
        return self.a2.shape[0]

    @property
    def needs_base(self) -> bool:
        return True

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        update = (self.b1.shape[0], *self.b2.shape[1:])
        if math.prod(update) != math.prod(shape) or update[0] != shape[0] or self.a1.shape[0] != shape[1]:
            return f"the GLoRA update has shape {update} but the base tensor is {tuple(shape)}"
        return None

    def _factors(self, ops: BlockOps) -> tuple[Array, Array, Array]:
        def make() -> tuple[Array, Array, Array]:
            a1, a2 = (r.load().reshape(r.shape[0], -1) for r in (self.a1, self.a2))
            b1, b2 = (r.load().reshape(r.shape[0], -1) for r in (self.b1, self.b2))
            scale = np.float32(self.scale)
            mix = np.ascontiguousarray((a1 @ a2) * scale, dtype=F32)
            return ops.array(mix), ops.array(np.ascontiguousarray(b1 * scale, dtype=F32)), ops.array(b2)

        return ops.cached(self, "factors", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        mix, b1, b2 = self._factors(ops)
        unmerged = block if base is None else base
        channels = mix.shape[0]
        # (rows, in, kernel) -> W[o, :, k] @ A at every kernel position k
        per_position = unmerged.reshape(unmerged.shape[0], channels, -1).swapaxes(1, 2) @ mix
        update = per_position.swapaxes(1, 2).reshape(unmerged.shape[0], -1)
        update += ops.product(b1[rows], b2)
        block += update

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        return {"kind": "glora", "rank": self.rank, "scale": self.scale}


@dataclass(frozen=True)
class OutputRotation(Edit):
    """LyCORIS' OFT and BOFT: rotations of the weight's output rows (viewed as ``(out, -1)``), then ``rescale``.

    Each block B of ``blocks`` gives Q = B - B^T, all of them together shrunk to Frobenius norm ``alpha * out``
    when larger (``alpha`` 0: no constraint), and the rotation r = (I + Q)(I - Q)^-1. OFT (``blocks`` (k, b, b)):
    the k row blocks of W become r_i^T W_i. BOFT (``blocks`` (m, k, b, b)): m butterfly stages; before stage i the
    rows are reordered, within groups of 2^i b rows, as the two halves of the group interleaved; the k blocks of b
    rows become r W_i; the order is undone. Then each row times its ``rescale``. A strength s is LyCORIS'
    multiplier: every rotation becomes I + s (r - I) (per stage for BOFT), ``rescale`` stays whole.
    """

    blocks: TensorRef
    rescale: TensorRef | None
    alpha: float
    strength: float = 1.0

    def refs(self) -> list[TensorRef]:
        return [self.blocks] + ([self.rescale] if self.rescale is not None else [])

    @property
    def butterfly(self) -> bool:
        return len(self.blocks.shape) == 4

    @property
    def rank(self) -> int:
        """The number of blocks (per stage): LyCORIS' "equivalent lora_dim"."""
        return self.blocks.shape[-3]

    @property
    def whole_tensor(self) -> bool:
        return True  # a BOFT stage mixes rows across the tensor; an OFT block spans b rows

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        *stages, count, size, _ = self.blocks.shape
        what = "BOFT" if stages else "OFT"
        if len(shape) < 2 or count * size != shape[0]:
            return (
                f"the LyCORIS {what} blocks ({count} of {size} rows) do not cover the {shape[0]} rows of {tuple(shape)}"
            )
        if stages and (size % 2 or count % 2 ** (stages[0] - 1)):
            return (
                f"{stages[0]} BOFT stages of {count} blocks of {size} rows: LyCORIS needs an even block size and a "
                f"block count divisible by {2 ** (stages[0] - 1)}"
            )
        if self.rescale is not None and math.prod(self.rescale.shape) != shape[0]:
            return f"rescale has {math.prod(self.rescale.shape)} values for the {shape[0]} rows of {tuple(shape)}"
        return None

    def rotations(self, rows: int) -> np.ndarray:
        """The rotations r (as ``blocks``' shape), in fp32, each already I + s (r - I)."""
        data = np.asarray(self.blocks.load(), dtype=F32)
        q = data - data.swapaxes(-1, -2)
        limit = self.alpha * rows
        if limit > 0:
            norm = float(np.linalg.norm(q.reshape(-1))) + 1e-8
            if norm > limit:
                q = q * np.float32(limit / norm)
        size = q.shape[-1]
        # cayley(X) = (I - X)(I + X)^-1, so cayley(-Q) is LyCORIS' (I + Q)(I - Q)^-1
        r = cayley(-q.reshape(-1, size, size)).reshape(q.shape)
        if self.strength != 1.0:
            eye = np.eye(size, dtype=F32)
            r = np.ascontiguousarray(eye + np.float32(self.strength) * (r - eye), dtype=F32)
        return r

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        def make() -> tuple[list[Array], Array | None]:
            r = self.rotations(block.shape[0])
            # on the columns of W^T: r^T W (OFT) is W^T @ r; r W (a BOFT stage) is W^T @ r^T
            stages = (
                [ops.array(np.ascontiguousarray(s.swapaxes(1, 2))) for s in r] if self.butterfly else [ops.array(r)]
            )
            scale = None if self.rescale is None else ops.array(ops.load(self.rescale).reshape(-1, 1))
            return stages, scale

        stages, scale = ops.cached(self, "rotations", make)
        columns = block.T  # (cols, out): the rows of W are its columns
        if not self.butterfly:
            multiply_block_diagonal(columns, stages[0])
        else:
            half = self.blocks.shape[-1] // 2
            out = block.shape[0]
            for i, rotations in enumerate(stages):
                groups = out // (2 * 2**i * half)
                shuffled = butterfly_order(columns, groups, 1, inverse=True)
                multiply_block_diagonal(shuffled, rotations)
                columns[...] = butterfly_order(shuffled, groups, 1)
        if scale is not None:
            block *= scale

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, strength=self._times(self.strength, strength))

    def describe(self) -> dict[str, Any]:
        *stages, count, size, _ = self.blocks.shape
        out: dict[str, Any] = {"kind": "lycoris-boft" if stages else "lycoris-oft", "blocks": count, "block_size": size}
        if stages:
            out["stages"] = stages[0]
        return out | {"constraint": self.alpha, "rescale": self.rescale is not None, "strength": self.strength}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        data = np.asarray(load(self.blocks))
        rotates = bool((data - data.swapaxes(-1, -2)).any()) and self.strength != 0
        return not rotates and (self.rescale is None or bool((np.asarray(load(self.rescale)) == 1).all()))
