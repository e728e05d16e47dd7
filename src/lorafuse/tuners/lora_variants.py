"""The LoRA variants PEFT merges (peft/tuners/lora/variants.py), read from their ``adapter_config.json`` keys.

- **VeLoRA** (``velora_config``) and **MonteCLoRA** (``monteclora_config``) change only training (VeLoRA's
  compressed activations, MonteCLoRA's sampled noise on lora_A); PEFT merges them as plain LoRA and so does
  lorafuse. Their saved training state (``lora_velora_embed``, the sampler's tensors) is read by nothing.
- **BD-LoRA** (``use_bdlora``): lora_A (modules matching ``target_modules_bd_a``) or lora_B (``..._bd_b``) is
  block-diagonal, saved as its ``nblocks`` diagonal blocks stacked; PEFT merges the full matrix.
- **KaSA** (``kasa_config``): PEFT replaces the base weight by its rank ``min(out, in) - r`` SVD truncation when
  it loads the adapter, then merges ``scale * B diag(lora_diag) A`` into it: :class:`KasaDelta`.

PEFT knows each variant on ``nn.Linear`` only and one variant per adapter; anything else is refused, as PEFT
refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..edits import Array, BlockOps, Edit, LoraDelta, TensorRef
from ..errors import AdapterError
from ..peft_flags import AdapterConfig, _shown, positive_int

# The config keys of the variants PEFT's Linear layer resolves (LoraConfig fields tagged is_lora_variant).
VARIANT_KEYS = ("use_dora", "kasa_config", "use_bdlora", "velora_config", "monteclora_config")
# Per-module tensors that only training reads, by the variant that saves them.
TRAINING_STATE = {
    "velora_config": ("lora_velora_embed",),
    "monteclora_config": tuple(
        f"lora_monteclora_sampler.{name}"
        for name in ("expert_weights", "expert_weights_prior", "gaussian_var_prior", "std_prior")
    ),
}
KASA_DIAG = "lora_diag"
VARIANT_PARAMS = (KASA_DIAG, *(name for names in TRAINING_STATE.values() for name in names))


def variant_of(config: AdapterConfig, source: str) -> str | None:
    """The one variant key the config turns on, or None for plain LoRA; two are refused (PEFT has no such
    combination)."""
    raw = config.raw
    on = [key for key in VARIANT_KEYS if raw.get(key) not in (None, False, {}, [])]
    if len(on) > 1:
        raise AdapterError(
            f"{source}: {' and '.join(on)} are set together, a combination PEFT has no LoRA layer for; "
            "fix adapter_config.json"
        )
    if on and on[0] != "use_dora" and not isinstance(raw[on[0]], dict):
        raise AdapterError(
            f"{source}: {on[0]} must be an object (PEFT's config of the variant), not {_shown(raw[on[0]])}"
        )
    return on[0] if on else None


def check_variant_slots(variant: str | None, module: str, slots: dict[str, str], linear: bool, source: str) -> None:
    """Refuse a variant's tensors without its config key, and a variant on a layer PEFT has it for none."""
    for key, names in (*TRAINING_STATE.items(), ("kasa_config", (KASA_DIAG,))):
        stray = [slots[n] for n in names if n in slots]
        if stray and variant != key:
            raise AdapterError(
                f"{source}: {stray[0]!r} belongs to a LoRA variant ({key}) that adapter_config.json does not "
                "turn on; fix the config or the adapter"
            )
    if variant not in (None, "use_dora") and not linear:
        raise AdapterError(
            f"{source}: module {module!r} is not a Linear layer, which is the only layer PEFT has {variant} for; "
            "the adapter is broken"
        )


@dataclass(frozen=True)
class BlockDiagonalRef(TensorRef):
    """A BD-LoRA factor saved as its ``blocks`` diagonal blocks stacked along rows, read as the full matrix (the
    blocks on the diagonal, zeros elsewhere), as PEFT's ``weight_as_blockdiagonal_matrix`` builds it."""

    blocks: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        rows, cols = super().shape
        return (rows, cols * self.blocks)

    def load(self) -> np.ndarray:
        stacked = super().load()
        rows, cols = stacked.shape
        step = rows // self.blocks
        full = np.zeros((rows, cols * self.blocks), dtype=stacked.dtype)
        for k in range(self.blocks):
            full[k * step : (k + 1) * step, k * cols : (k + 1) * cols] = stacked[k * step : (k + 1) * step]
        return full


def _names(value: Any, what: str, source: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterError(
            f"{source}: use_bdlora.{what} must list module names, not {_shown(value)}: fix adapter_config.json"
        )
    return value


def bdlora_refs(
    raw: dict[str, Any], module: str, a_ref: TensorRef, b_ref: TensorRef, source: str
) -> tuple[TensorRef, TensorRef]:
    """lora_A and lora_B of a BD-LoRA module, the block-diagonal one read whole.

    PEFT picks the block-diagonal factor by substring of the module's name (``pattern in target_name``).
    """
    settings = raw["use_bdlora"]  # an object (variant_of)
    blocks = positive_int(settings.get("nblocks"), f"{source}: use_bdlora.nblocks", "set it to the trained nblocks")
    on_a = any(p in module for p in _names(settings.get("target_modules_bd_a"), "target_modules_bd_a", source))
    on_b = any(p in module for p in _names(settings.get("target_modules_bd_b"), "target_modules_bd_b", source))
    if on_a and on_b:
        raise AdapterError(f"{source}: module {module!r} matches both BD-LoRA patterns (PEFT refuses it too)")
    if not (on_a or on_b):
        if settings.get("match_strict", True):
            raise AdapterError(f"{source}: module {module!r} matches neither BD-LoRA pattern (PEFT refuses it too)")
        return a_ref, b_ref
    ref = a_ref if on_a else b_ref
    if len(ref.shape) != 2 or ref.shape[0] % blocks:
        raise AdapterError(
            f"{source}: {ref.name!r} {ref.shape} cannot hold {blocks} diagonal blocks (use_bdlora.nblocks)"
        )
    full = BlockDiagonalRef(ref.checkpoint, ref.name, blocks=blocks)
    return (full, b_ref) if on_a else (a_ref, full)


@dataclass(frozen=True)
class KasaDelta(LoraDelta):
    """KaSA: W := SVD truncation of W to rank ``min(out, in) - r``, then W += scale * (B * lora_diag) @ A.

    PEFT truncates the weight the adapter is loaded on, so the truncation applies to the tensor as the edits
    before this one left it; it needs the whole tensor (an SVD), in fp32 like PEFT's.
    """

    diag: TensorRef | None = None

    def refs(self) -> list[TensorRef]:
        return [*super().refs(), self.diag] if self.diag is not None else super().refs()

    @property
    def whole_tensor(self) -> bool:
        return True

    @property
    def changes_base(self) -> bool:
        return True

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        err = super().shape_error(shape)
        if err or self.diag is None:
            return err
        if tuple(self.diag.shape) != (self.rank,):
            return f"lora_diag has shape {self.diag.shape}, not ({self.rank},)"
        if self.rank >= min(shape):
            return f"KaSA's rank {self.rank} leaves nothing of a {shape[0]}x{shape[1]} weight (PEFT refuses it too)"
        return None

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        edit = super().oriented(shape, conv1d)
        if isinstance(edit, LoraDelta) and edit.layout != "linear":
            raise AdapterError(
                f"{self.adapter}: {self.source_key!r} is a KaSA update of a GPT-2 Conv1D layer, which PEFT does "
                "not support (its SVD truncation is defined for Linear weights): the adapter cannot be merged"
            )
        return edit

    def factors(self, ops: BlockOps) -> tuple[Array, Array]:
        def make() -> tuple[Array, Array]:
            assert self.diag is not None
            a = ops.load(self.A)
            b = ops.load(self.B)
            b *= ops.load(self.diag).reshape(1, -1)
            b *= np.float32(self.scale)
            return b, a

        return ops.cached(self, "factors", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        u, s, vh = ops.svd(block)
        kept = min(block.shape) - self.rank
        block[...] = ops.product(u[:, :kept] * s[:kept], vh[:kept])  # PEFT rebuilds it from the kept components
        left, right = self.factors(ops)
        block += ops.product(left, right)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kind": "kasa"}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return False  # the truncation changes the weight whatever lora_B holds

    def delta_norm(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> float | None:
        return None  # the truncation depends on the base
