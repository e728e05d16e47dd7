"""PEFT VeRA and PVeRA: W += (lambda_b * B[:out]) @ (lambda_d * A[:r, :in]), as PEFT merges them
(peft/tuners/vera/layer.py, peft/tuners/pvera/layer.py).

A (rows, max in) and B (max out, r) are random projections shared by every layer of the adapter, each layer taking
its top-left slice; only the vectors lambda_b (out) and lambda_d (r) are trained per layer. PVeRA trains a mean and a
log-variance half (lambda_d and A have 2r rows) and merges with the mean half, the first r. The projections are saved
in the adapter (``save_projection``, the default) or, when not, regenerated from ``projection_prng_key`` as PEFT
creates them: torch's CPU generator, Kaiming-uniform A then B, sized by the largest input and output of the wrapped
layers. The largest input is the base's: each edit learns its layer's when the plan orients it, and the
regeneration waits for all of them. PEFT wraps Linear and GPT-2 Conv1D layers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..edits import Edit, FactoredUpdate, TargetedEdit, TensorRef, fp32_of, transposed_for
from ..errors import AdapterError
from ..peft_flags import CONFIG_NAME, positive_int
from ..torch_bridge import require_torch
from .registry import Tuner, TunerInput, register_tuner


class Regenerated:
    """One adapter's projections rebuilt from ``projection_prng_key``, once, when every wrapped layer's input size
    is known (:meth:`note`, from the plan's orientation of each edit)."""

    def __init__(self, seed: int, a_rows: int, rank: int, out_dim: int, modules: frozenset[str], what: str) -> None:
        self.seed, self.a_rows, self.rank, self.out_dim = seed, a_rows, rank, out_dim
        self.modules, self.what = modules, what
        self.inputs: dict[str, int] = {}
        self._lock = threading.Lock()
        self._matrices: tuple[np.ndarray, np.ndarray] | None = None

    def note(self, module: str, in_features: int) -> None:
        """Record the input size of ``module`` (its base weight's)."""
        with self._lock:
            if self._matrices is not None and self.inputs.get(module) != in_features:
                raise AdapterError(f"{self.what}: the projections were built for other layer sizes")
            self.inputs[module] = in_features

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) as PEFT's ``_init_vera_A_vera_B`` makes them, in fp32."""
        with self._lock:
            if self._matrices is None:
                missing = sorted(self.modules - self.inputs.keys())
                if missing:
                    raise AdapterError(
                        f"{self.what}: the projections depend on every wrapped layer's size, and the base model has "
                        f"no {missing[0]!r}; merge into the base model the adapter was trained on"
                    )
                torch = require_torch(self.what)
                generator = torch.Generator(device="cpu").manual_seed(self.seed)
                in_dim = max(self.inputs.values())
                a = torch.nn.init.kaiming_uniform_(torch.empty(self.a_rows, in_dim), generator=generator)
                b = torch.nn.init.kaiming_uniform_(torch.empty(self.out_dim, self.rank), generator=generator)
                self._matrices = (a.numpy(), b.numpy())
            return self._matrices


@dataclass(frozen=True)
class VeraDelta(FactoredUpdate):
    """W += scale * (lambda_b * B[:out, :]) @ (lambda_d[:r] * A[:r, :in]) (``scale``: 1 times any strength).

    ``A``/``B`` are the saved projections, or ``regenerated`` builds them. ``transposed``: the target is a GPT-2
    Conv1D weight (in, out); it and ``in_features`` are set by :meth:`oriented` from the base.
    """

    lambda_b: TensorRef
    lambda_d: TensorRef
    rank: int
    module: str
    A: TensorRef | None = None
    B: TensorRef | None = None
    regenerated: Regenerated | None = None
    scale: float = 1.0
    transposed: bool = False
    in_features: int | None = None
    kind: str = "vera"

    def refs(self) -> list[TensorRef]:
        return [r for r in (self.lambda_b, self.lambda_d, self.A, self.B) if r is not None]

    @property
    def out_features(self) -> int:
        return math.prod(self.lambda_b.shape)

    def _fits(self, shape: tuple[int, ...], transposed: bool) -> bool:
        return len(shape) == 2 and shape[1 if transposed else 0] == self.out_features

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        """Linear or GPT-2 Conv1D by ``conv1d``; unknown, by the one orientation the shape fits (square: refused).
        The layer's input size goes to the regenerated projections."""
        if len(shape) != 2:
            return self
        transposed = transposed_for(self, shape, conv1d, lambda t: self._fits(shape, t), self.transposed)
        in_features = shape[0] if transposed else shape[1]
        if self.regenerated is not None:
            self.regenerated.note(self.module, in_features)
        return replace(self, transposed=transposed, in_features=in_features)

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        d = math.prod(self.lambda_d.shape)
        if d != (2 * self.rank if self.kind == "pvera" else self.rank):
            return f"{self.kind}_lambda_d has {d} values for rank {self.rank}"
        if not self._fits(shape, self.transposed):
            return f"{self.kind}_lambda_b scales {self.out_features} output features but the base tensor is {shape}"
        inputs = shape[0] if self.transposed else shape[1]
        if self.regenerated is not None:
            require_torch(self.regenerated.what)  # before any writing
            return None
        assert self.A is not None and self.B is not None
        a, b = tuple(self.A.shape), tuple(self.B.shape)
        if len(a) != 2 or a[0] != d or a[1] < inputs:
            return f"the shared {self.kind}_A {a} has no ({d}, {inputs}) slice for this layer"
        if len(b) != 2 or b[1] != self.rank or b[0] < self.out_features:
            return f"the shared {self.kind}_B {b} has no ({self.out_features}, {self.rank}) slice for this layer"
        return None

    def _factors(self) -> tuple[np.ndarray, np.ndarray]:
        if self.in_features is None:
            raise AdapterError(f"{self.adapter}: {self.source_key!r} was not oriented on its base weight")
        if self.regenerated is not None:
            a, b = self.regenerated.matrices()
        else:
            assert self.A is not None and self.B is not None
            a, b = fp32_of(self.A), fp32_of(self.B)
        lambda_b = fp32_of(self.lambda_b).reshape(-1, 1)
        lambda_d = fp32_of(self.lambda_d).reshape(-1, 1)[: self.rank]
        left = lambda_b * b[: self.out_features, :]
        right = lambda_d * a[: self.rank, : self.in_features]
        if self.scale != 1.0:
            left *= np.float32(self.scale)
        return left, right

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        where = "saved" if self.regenerated is None else f"regenerated from projection_prng_key={self.regenerated.seed}"
        row: dict[str, Any] = {"kind": self.kind, "rank": self.rank, "scale": self.scale, "projections": where}
        if self.in_features is not None:
            pair = [self.in_features, self.out_features]
            row["shape"] = pair if self.transposed else pair[::-1]
        return row

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        lambda_d = np.asarray(load(self.lambda_d)).reshape(-1)[: self.rank]
        return self.scale == 0.0 or not np.asarray(load(self.lambda_b)).any() or not lambda_d.any()

    def delta_norm(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> float | None:
        """``||update||_F`` where it is known without building projections: saved ones, on an oriented layer."""
        if self.no_effect(load):
            return 0.0
        if self.regenerated is not None or self.in_features is None or self.A is None or self.B is None:
            return None
        b = np.asarray(load(self.B), dtype=np.float64)[: self.out_features]
        b = b * np.asarray(load(self.lambda_b), dtype=np.float64).reshape(-1, 1)
        a = np.asarray(load(self.A), dtype=np.float64)[: self.rank, : self.in_features]
        a = a * np.asarray(load(self.lambda_d), dtype=np.float64).reshape(-1, 1)[: self.rank]
        return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0)) * abs(self.scale)


def _seed(raw: dict[str, Any], source: str) -> int:
    value = raw.get("projection_prng_key", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise AdapterError(
            f"{source}: projection_prng_key is {str(value)[:60]}, not a whole number from 0 to 2**64 - 1: set it to "
            f"the key the adapter was trained with in {CONFIG_NAME}"
        )
    return value


def _save_projection(raw: dict[str, Any], source: str) -> bool:
    value = raw.get("save_projection", True)
    if not isinstance(value, bool):
        raise AdapterError(f"{source}: save_projection must be true or false, not {str(value)[:60]}: fix {CONFIG_NAME}")
    return value


def _shared(tuner_input: TunerInput, name: str) -> TensorRef | None:
    """The shared projection ``name`` (``base_model.vera_A``, with or without an adapter name after it)."""
    keys = [k for k in tuner_input.shared if k.removeprefix("base_model.").split(".")[0] == name]
    if len(keys) > 1:
        raise AdapterError(f"{tuner_input.source}: holds {len(keys)} {name} projections ({keys[0]!r}, ...); keep one")
    return TensorRef(tuner_input.checkpoint, keys[0]) if keys else None


def _reader(kind: str) -> Callable[[TunerInput], tuple[list[TargetedEdit], dict[str, int]]]:
    """The reader of ``kind`` ("vera" or "pvera": PEFT's parameter prefix)."""

    def read(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
        source, raw = tuner_input.source, tuner_input.config.raw
        rank = positive_int(raw.get("r", 256), f"{source}: r", "set it to the rank the adapter was trained with")
        seed = _seed(raw, source)
        a_ref, b_ref = _shared(tuner_input, f"{kind}_A"), _shared(tuner_input, f"{kind}_B")
        regenerated = None
        if not _save_projection(raw, source):  # PEFT then rebuilds them, whatever the file holds
            a_ref = b_ref = None
            outs = [
                math.prod(tuner_input.checkpoint.infos[s[f"{kind}_lambda_b"]].shape)
                for s in _modules(tuner_input).values()
            ]
            what = f"{source}: a {kind.upper()} adapter saved without its projections (save_projection=false)"
            a_rows = 2 * rank if kind == "pvera" else rank
            regenerated = Regenerated(seed, a_rows, rank, max(outs, default=0), frozenset(tuner_input.modules), what)
        elif a_ref is None or b_ref is None:
            raise AdapterError(
                f"{source}: save_projection is true but the adapter holds no base_model.{kind}_A / {kind}_B "
                "projections; the adapter file is incomplete"
            )
        edits: list[TargetedEdit] = []
        for module, slots in _modules(tuner_input).items():
            lambda_b = TensorRef(tuner_input.checkpoint, slots[f"{kind}_lambda_b"])
            lambda_d = TensorRef(tuner_input.checkpoint, slots[f"{kind}_lambda_d"])
            edit = VeraDelta(
                lambda_b,
                lambda_d,
                rank,
                module,
                a_ref,
                b_ref,
                regenerated,
                transposed=tuner_input.config.fan_in_fan_out,  # a hint only: the plan orients it by the layer
                kind=kind,
                adapter=tuner_input.label,
                source_key=lambda_b.name,
            )
            edits.append(TargetedEdit(f"{module}.weight", edit))
        return edits, {module: rank for module in tuner_input.modules}

    def _modules(tuner_input: TunerInput) -> dict[str, dict[str, str]]:
        for module, slots in tuner_input.modules.items():
            for part in ("lambda_b", "lambda_d"):
                if f"{kind}_{part}" not in slots:
                    raise AdapterError(
                        f"{tuner_input.source}: module {module!r} has no {kind}_{part} tensor; the adapter is "
                        "incomplete"
                    )
        return tuner_input.modules

    return read


VERA = register_tuner(
    Tuner(
        "VERA",
        ("vera_lambda_b", "vera_lambda_d"),
        _reader("vera"),
        shared=("vera_A", "vera_B"),
        description="VeRA (shared random projections scaled by trained vectors)",
        extra={"layers": ("linear", "gpt2_conv1d")},
    )
)
PVERA = register_tuner(
    Tuner(
        "PVERA",
        ("pvera_lambda_b", "pvera_lambda_d"),
        _reader("pvera"),
        shared=("pvera_A", "pvera_B"),
        description="PVeRA (VeRA with a mean / log-variance split; merged with the mean half)",
        extra={"layers": ("linear", "gpt2_conv1d")},
    )
)
