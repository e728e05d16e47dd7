"""A GGUF model (llama.cpp, Ollama) read as a checkpoint: its tensors under their transformers names and shapes,
dequantized to float32 row by row (gguf-py's dequantizers), with the q/k row order of rope models undone, so
adapters trained on the transformers model resolve and merge against it as against the safetensors original.

The raw tensors stay reachable (:meth:`GGUFCheckpoint.raw`): a GGUF output copies the untouched ones byte for byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..names.gguf import (
    GGUFArch,
    gguf_arch_named,
    hf_architecture,
    hf_names,
    norm_shift,
    qk_heads_of_gguf,
    qk_row_order,
    require_gguf,
)
from .checkpoint import Checkpoint
from .safetensors_file import TensorInfo

HF_EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class RawTensor:
    """One tensor as the GGUF file stores it."""

    name: str  # the GGUF name
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows first), as transformers has it
    offset: int  # absolute
    nbytes: int
    heads: int | None  # q/k of a rope model: the head count its rows were reordered by
    shift: float = 0.0  # what the converter added to the values (Gemma's norms): taken off as they are read


class GGUFCheckpoint(Checkpoint):
    """The tensors of one GGUF file by transformers name, as float32 (``infos[...].code`` is ``F32``).

    ``fields``: the file's key/value pairs (gguf-py ``ReaderField`` objects, in file order); ``spec``: the
    conversion its architecture follows (names/gguf.py); ``params``: the few hyperparameters the mapping needs.
    """

    def __init__(self, path: Path):
        gguf = require_gguf()
        path = Path(path)
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # noqa: BLE001 -- gguf-py raises many kinds on a damaged file
            raise InputError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.files = [path]
        self.metadata: dict[str, str] = {}
        self._pickled: dict[Path, dict[str, Any]] = {}
        self._fds: dict[Path, int] = {}
        self.fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        self.alignment = int(self.value("general.alignment", 32))
        arch = str(self.value("general.architecture", ""))
        self.spec: GGUFArch = gguf_arch_named(arch, str(path))
        blocks = int(self.value(f"{arch}.block_count", 0))
        heads = qk_heads_of_gguf(
            self.value(f"{arch}.attention.head_count"), self.value(f"{arch}.attention.head_count_kv")
        )
        names = hf_names(self.spec, blocks)
        self.infos: dict[str, TensorInfo] = {}
        self.raws: dict[str, RawTensor] = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            hf = names.get(t.name, t.name)  # tensors transformers has no name for (rope_freqs) keep theirs
            moved = heads.get(t.name.split(".")[-2]) if self.spec.permute_qk and "." in t.name else None
            self.raws[hf] = RawTensor(
                t.name, t.tensor_type, shape, int(t.data_offset), int(t.n_bytes), moved, norm_shift(self.spec, hf)
            )
            count = int(np.prod(shape, dtype=np.int64))
            self.infos[hf] = TensorInfo(hf, path, "F32", shape, -1, count * 4)
        del reader  # its memory map: rows are read with pread

    @property
    def config(self) -> dict[str, Any]:
        """What a transformers config.json would say that the plan asks: the architecture (no Conv1D layers), the
        vocabulary size and whether the head is the embedding (a GGUF without ``output.weight``)."""
        embedding = self.raws.get(HF_EMBEDDING)
        return {
            "architectures": [hf_architecture(self.spec)],
            "model_type": self.spec.arch.lower(),
            "tie_word_embeddings": not any(r.name == "output.weight" for r in self.raws.values()),
            **({"vocab_size": embedding.shape[0]} if embedding is not None else {}),
        }

    def value(self, key: str, default: Any = None) -> Any:
        """The value of key ``key`` (``default`` when the file has none)."""
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def raw(self, name: str) -> RawTensor:
        return self.raws[name]

    @property
    def is_safetensors(self) -> bool:
        return False

    def _rows(self, raw: RawTensor, first: int, last: int, stored: bool = False) -> np.ndarray:
        """GGUF rows ``first:last`` (along the first numpy axis) dequantized, as (rows, rest) float32; the
        converter's shift taken off unless ``stored``."""
        gguf = require_gguf()
        rows = raw.shape[0] if raw.shape else 1
        row_bytes = raw.nbytes // max(rows, 1)
        data = np.empty((last - first) * row_bytes, dtype=np.uint8)
        view, at, done = memoryview(data), raw.offset + first * row_bytes, 0
        fd = self.fd(self.files[0])
        while done < len(data):
            n = os.preadv(fd, [view[done:]], at + done)
            if n <= 0:
                raise InputError(f"{self.files[0]} ends inside tensor {raw.name}")
            done += n
        cols = int(np.prod(raw.shape[1:], dtype=np.int64)) if len(raw.shape) > 1 else 1
        try:
            values = gguf.quants.dequantize(data.reshape(last - first, row_bytes), raw.qtype)
        except NotImplementedError:
            raise InputError(
                f"{self.files[0]}: tensor {raw.name} is {raw.qtype.name}, which gguf-py cannot read"
            ) from None
        values = np.asarray(values, dtype=np.float32).reshape(last - first, cols)
        if raw.shift and not stored:  # Gemma's norms: llama.cpp stores 1 + weight, transformers the weight
            values = values - np.float32(raw.shift)
        return values

    def array(self, name: str, stored: bool = False) -> np.ndarray:
        """Tensor ``name`` in transformers' row order, float32: its transformers values, or with ``stored`` the
        values the file holds (Gemma's norms still shifted)."""
        raw = self.raws[name]
        rows = raw.shape[0] if raw.shape else 1
        values = self._rows(raw, 0, rows, stored)
        if raw.heads is not None:  # GGUF row r holds transformers row order[r]
            restored = np.empty_like(values)
            restored[qk_row_order(rows, raw.heads)] = values
            values = restored
        return values.reshape(raw.shape)

    def elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``start:stop`` of tensor ``name`` flattened (transformers order), float32; only the rows that
        hold them are read and dequantized (all of them for q/k, whose rows moved)."""
        raw, info = self.raws[name], self.infos[name]
        if not 0 <= start <= stop <= info.numel:
            raise InputError(f"{self.files[0]}: elements {start}:{stop} are outside tensor {name!r} ({info.numel})")
        rows = raw.shape[0] if raw.shape else 1
        cols = info.numel // max(rows, 1) or 1
        if raw.heads is not None:
            flat = self.array(name).reshape(-1)[start:stop]
        else:
            first, last = start // cols, -(-stop // cols)
            flat = self._rows(raw, first, last).reshape(-1)[start - first * cols : stop - first * cols]
        if out is None:
            return flat
        result = out[: flat.nbytes].view(np.float32)
        result[:] = flat
        return result
