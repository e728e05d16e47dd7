"""One GGUF file (llama.cpp, Ollama) written from the merge stream, with no intermediate HF folder.

The kernel hands each merged tensor's rows in the plan's dtype (the base's, rounded once as in a safetensors
merge); the sink converts them as llama.cpp's ``convert_hf_to_gguf.py`` converts the saved merged model: to
float32, q/k rows reordered for rope models, then to the tensor's GGUF type (gguf-py's quantizers), written at the
tensor's offset. Rows are converted as they come (quantization blocks never cross a row), so memory stays at a few
row blocks; only q/k of rope models, whose rows move, are held whole until complete.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arrays import BF16, F16, dtype_of, round_to
from ..errors import LorafuseError
from ..fastcast import FAST, bits16, contiguous
from ..gguf_quant import quantize
from ..io.layout import Slot
from ..io.splice import FreshPageWriter
from ..io.writer import copy_file_range
from ..names.gguf import GGUF_EXTRA, qk_row_order, require_gguf
from .base import ModelWriter, ShardLayout

if TYPE_CHECKING:
    from ..gguf_header import GGUFTensor
    from ..io.gguf_checkpoint import GGUFCheckpoint
    from ..io.prefill import Prefill

COPY_CHUNK_BYTES = 16 << 20  # an untouched tensor is read and converted this much at a time


@dataclass
class GGUFOutput:
    """What a GGUF file needs besides the tensors: the base model folder (config and tokenizer) and the output
    type, or the GGUF base (io/gguf_checkpoint.py) with the tensors the merge changes and the type of those it
    cannot quantize back (``requant``); the string keys to add (provenance); the warnings list to extend."""

    folder: Path | None = None
    outtype: str = "auto"
    extra: dict[str, str] | None = None
    base: GGUFCheckpoint | None = None
    touched: set[str] = field(default_factory=set)
    requant: str = "q8_0"
    warnings: list[str] = field(default_factory=list)


class GGUFModelWriter(ModelWriter):
    """``--format gguf``: one ``.gguf`` file. Needs the ``gguf`` extra; :attr:`output` set before :meth:`open`."""

    name = "gguf"
    suffix = ".gguf"

    def __init__(self, output: GGUFOutput | None = None):
        self.output = output

    def check_available(self) -> None:
        require_gguf()

    def layout(
        self, slots: list[Slot], prefix: str, max_shard_size: int, single_name: str | None = None
    ) -> ShardLayout:
        """Always one file: llama.cpp's split GGUFs are made with ``llama-gguf-split`` from a whole one."""
        return ShardLayout([slots], [single_name or f"{prefix}{self.suffix}"], None)

    def open(
        self,
        folder: Path,
        layout: ShardLayout,
        metadata: dict[str, str] | None = None,
        prefill: Prefill | None = None,
    ) -> GGUFSink:
        from ..gguf_header import auto_outtype, base_header, build_header, load_hparams, plan_tensors, write_header
        from ..names.gguf import gguf_arch_of

        out = self.output
        if out is None or (out.folder is None and out.base is None):
            raise LorafuseError("GGUF output needs the base model's folder (its config.json and tokenizer)")
        extra = {**(out.extra or {}), **(metadata or {})}
        if out.base is not None:
            header, tensors = base_header(out.base, out.touched, out.requant, extra, out.warnings)
        else:
            assert out.folder is not None
            params = load_hparams(out.folder)
            spec = gguf_arch_of(params, str(out.folder / "config.json"))
            slots = layout.slots
            outtype = out.outtype
            if outtype == "auto":
                outtype = auto_outtype([(s.shape, dtype_of(s.dtype)) for s in slots])
            tensors = plan_tensors(spec, params, [(s.name, s.shape) for s in slots], outtype, out.folder)
            lost = sorted(out.touched - {t.source for t in tensors})
            if lost:  # the converter leaves these out (Gemma's head is its embedding): the merge would be lost
                raise LorafuseError(
                    f"the adapters change {', '.join(lost)}, which llama.cpp's {spec.arch.lower()} does not have"
                )
            header = build_header(spec, params, out.folder, tensors, outtype, extra)
        path = folder / layout.names[0]
        size = write_header(header, path, tensors)
        return GGUFSink(path, size, {t.source: t for t in tensors}, out.base.files[0] if out.base else None)


def to_f16(values: np.ndarray) -> np.ndarray:
    """float32, bfloat16 or float16 -> float16, correctly rounded from the value (what gguf-py's F16 of the
    float32 value is; bf16 and f16 are exact in float32), without torch: bfloat16 by ml_dtypes' direct cast (0.6 ns
    a value; torch's bf16 -> f16 cast is scalar) or the compiled conversion (fastcast.py), float32 by
    ``arrays.round_to``."""
    if values.dtype == np.float16:
        return values
    if values.dtype == BF16:
        out = np.empty(values.shape, dtype=np.float16)
        if FAST is not None and contiguous(values):
            FAST.bf16_to_f16(bits16(values), bits16(out))
        else:
            np.copyto(out, values, casting="unsafe")
        return out
    return round_to(np.ascontiguousarray(values, dtype=np.float32), F16)


def shifted(stored: np.ndarray, shift: float) -> np.ndarray:
    """``stored`` as float32 plus ``shift`` (Gemma's norms) where the converter adds it: in the stored precision
    for float16/float32 (torch keeps those as they are), after the float32 cast for the rest."""
    native = stored.dtype.name in ("float16", "float32")
    if shift and native:
        stored = stored + stored.dtype.type(shift)
    values = stored.astype(np.float32)
    if shift and not native:
        values += np.float32(shift)
    return values


class _Held:
    """A q/k tensor collected whole (its rows move), in float32."""

    def __init__(self, rows: int, cols: int):
        self.array = np.empty((rows, cols), dtype=np.float32)
        self.left = rows * cols


class GGUFSink:
    """Converts and writes the kernel's row blocks into a GGUF file whose header is already written."""

    def __init__(self, path: Path, size: int, tensors: dict[str, GGUFTensor], base: Path | None = None):
        self.gguf = require_gguf()
        self.tensors = tensors
        self.base_fd = os.open(base, os.O_RDONLY) if base is not None else -1
        self.fd = os.open(path, os.O_WRONLY)
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._fresh = FreshPageWriter()  # a new file: its pages are all fresh
        try:
            os.ftruncate(self.fd, size)  # the padding between tensors reads as zeros, as llama.cpp writes it
            for t in tensors.values():
                if t.generated is not None:  # no checkpoint tensor feeds these (Phi-3's rope factors)
                    self._put(t, t.generated, 0)
        except BaseException:
            self.close()
            raise

    def holds(self, slot: Slot, path: Path, offset: int) -> bool:
        """An untouched tensor of a GGUF base: its bytes are copied here as they are (True); others are converted."""
        t = self.tensors.get(slot.name)
        if t is None or t.raw is None:
            return t is None  # a tensor llama.cpp does not use: nothing to write
        copy_file_range(self.base_fd, t.raw[0], self.fd, t.offset, t.raw[1])
        return True

    def write(self, slot: Slot, data: memoryview, at: int = 0) -> None:
        """Convert the elements ``data`` holds (whole rows, from byte ``at`` of the plan's tensor) and write them."""
        t = self.tensors.get(slot.name)
        if t is None or not len(data):
            return  # a tensor llama.cpp does not use
        dtype = dtype_of(slot.dtype)
        first = at // dtype.itemsize
        kept = int(np.prod(t.shape, dtype=np.int64)) - first  # Gemma3's embedding: rows past its tokens are left out
        if kept <= 0:
            return
        stored = np.frombuffer(data, dtype=dtype)[:kept]
        if t.qtype == self.gguf.GGMLQuantizationType.F16 and t.heads is None and not t.shift:
            self._put(t, stored, first)  # one cast, no float32 copy (to_f16 rounds as the float32 route does)
            return
        values = shifted(stored, t.shift)
        if t.heads is not None:
            self._hold(t, values, first)
            return
        self._put(t, values, first)

    def _put(self, t: GGUFTensor, values: np.ndarray, first: int) -> None:
        """Convert ``values`` (float32; for F16 any float dtype) to the tensor's type and write them at element
        ``first``."""
        block_size, type_size = self.gguf.GGML_QUANT_SIZES[t.qtype]
        if block_size > 1:  # quantization blocks run along rows: only whole rows can be converted
            cols = t.shape[-1]
            if first % cols or values.size % cols:
                raise LorafuseError(f"tensor {t.source}: a block that is not whole rows reached the GGUF writer")
            values = values.reshape(-1, cols)
        if t.qtype == self.gguf.GGMLQuantizationType.F16:
            out = to_f16(values)
        else:
            out = quantize(values, t.qtype)
        out = np.ascontiguousarray(out)
        at = t.offset + first // block_size * type_size
        if out.flags.owndata:  # made here (converted, quantized): the writer thread may have it
            self._fresh.submit(self.fd, memoryview(out).cast("B"), at)
        else:  # a view of the caller's rows (already f16)
            self._fresh.write(self.fd, memoryview(out).cast("B"), at)

    def _hold(self, t: GGUFTensor, values: np.ndarray, first: int) -> None:
        rows = t.shape[0]
        cols = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
        with self._lock:
            held = self._held.setdefault(t.source, _Held(rows, cols))
        held.array.reshape(-1)[first : first + values.size] = values
        with self._lock:
            held.left -= values.size
            complete = held.left == 0
            if complete:
                del self._held[t.source]
        if complete:
            self._put(t, held.array[qk_row_order(rows, t.heads)].reshape(-1), 0)

    def copy(self, slot: Slot, src_fd: int, src_offset: int) -> None:
        """An untouched tensor: read from the base file in whole-row chunks and converted like merged rows."""
        itemsize = dtype_of(slot.dtype).itemsize
        row = max(1, int(np.prod(slot.shape[1:], dtype=np.int64))) * itemsize if len(slot.shape) > 1 else itemsize
        step = max(row, COPY_CHUNK_BYTES // row * row)
        buffer = bytearray(min(step, slot.nbytes))
        done = 0
        while done < slot.nbytes:
            n = min(step, slot.nbytes - done)
            view = memoryview(buffer)[:n]
            got = 0
            while got < n:
                read = os.preadv(src_fd, [view[got:]], src_offset + done + got)
                if read <= 0:
                    raise LorafuseError(f"the base file ended early while reading tensor {slot.name}")
                got += read
            self.write(slot, view, done)
            done += n

    def flush(self) -> None:
        """Wait for every converted piece handed to the writer thread; raise a failed write."""
        self._fresh.flush()

    def close(self) -> None:
        self._fresh.close()
        for fd in (self.fd, self.base_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.base_fd = -1


PROVENANCE_KEY = "lorafuse.merge"  # what was merged in (adapters and their sha256), beside llama.cpp's keys


def check_gguf_request(output: Path, outtype: str) -> None:
    """Before anything is resolved or read: the output is one ``.gguf`` file, the outtype one lorafuse writes, the
    gguf package installed; one-line errors otherwise."""
    from ..gguf_header import OUTTYPE_CHOICES

    if output.suffix != ".gguf":
        raise LorafuseError(f"a GGUF output is one file: give -o a path ending in .gguf, not {output}")
    if outtype not in OUTTYPE_CHOICES:
        raise LorafuseError(
            f"unknown --outtype {outtype!r}: use {', '.join(OUTTYPE_CHOICES)} (for K-quants, run llama.cpp's "
            "llama-quantize on the f16 GGUF)"
        )
    try:
        require_gguf()
    except LorafuseError:
        raise LorafuseError(f"--format gguf needs the gguf package: {GGUF_EXTRA}") from None


def check_gguf_base(base: Path, config: dict[str, Any] | None, requant: str = "q8_0") -> None:
    """Before the adapters are read: a base lorafuse can convert (a model folder of a listed architecture), or a
    GGUF file (its architecture is checked as it is opened) with a ``requant`` type gguf-py writes."""
    from ..gguf_header import OUTTYPES, prefetch_hparams
    from ..names.gguf import gguf_arch_of

    if base.is_file() and base.suffix == ".gguf":
        if requant not in OUTTYPES:
            raise LorafuseError(f"unknown --requant {requant!r}: use {', '.join(OUTTYPES)}")
        return
    if not base.is_dir():
        raise LorafuseError(f"GGUF output needs the base model's folder (config.json and tokenizer), not {base}")
    gguf_arch_of(config, str(base / "config.json"))
    readme = base / "README.md"
    hints = [base.name, str((config or {}).get("_name_or_path", "")), *((config or {}).get("architectures") or [])]
    text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
    if "# qwen3-reranker" in text or any("reranker" in h.lower() for h in hints):
        raise LorafuseError(f"{base} is a Qwen3 reranker: its GGUF classifier head is not implemented")
    prefetch_hparams(base)  # read as the converter reads it, beside the adapters and the plan


def _provenance(merged: str, base: Any, folder: Path | None) -> str:
    """What was merged (provenance.py's record) plus what identifies the base cheaply: the sha256 of a model
    folder's config and tokenizer files, or of a GGUF base's header (keys and tensor table); hashing gigabytes of
    weights would cost the merge as much again."""
    import hashlib
    import json

    from ..io.extra_files import TOKENIZER_FILES
    from ..io.gguf_checkpoint import GGUFCheckpoint
    from ..report import sha256_file

    record = json.loads(merged)
    if isinstance(base, GGUFCheckpoint):
        first = min((raw.offset for raw in base.raws.values()), default=0)
        with open(base.files[0], "rb") as handle:
            record["base"] = {"gguf_header_sha256": hashlib.sha256(handle.read(first)).hexdigest()}
    elif folder is not None:
        names = ("config.json", "generation_config.json", "tokenizer.model", *TOKENIZER_FILES)
        record["base"] = {"files": {n: sha256_file(folder / n) for n in dict.fromkeys(names) if (folder / n).is_file()}}
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def write_gguf(
    plan: Any,
    report: Any,
    base_folder: Path | None,
    output: Path,
    outtype: str,
    requant: str,
    device: str,
    progress: Any,
    checked: Any,
) -> None:
    """Write the merged model as one GGUF file at ``output``, atomically; the provenance under
    :data:`PROVENANCE_KEY`. From a model folder (``base_folder``): converted as llama.cpp converts, to
    ``outtype``. From a GGUF base (the plan's checkpoint): its keys and untouched tensors as they are, merged
    tensors quantized back to their type, or to ``requant`` where gguf-py cannot (a warning in the report)."""
    from ..engine.kernel import copied
    from ..io.gguf_checkpoint import GGUFCheckpoint
    from ..io.output import AtomicOutput
    from ..merger import report_nonfinite, write_model
    from .provenance import METADATA_KEY, provenance_metadata

    if plan.resized_by:
        raise LorafuseError(
            f"{', '.join(plan.resized_by)} resize the vocabulary: a GGUF holds the tokenizer, and the base's does not "
            "know the added tokens; merge to safetensors, put the adapter's tokenizer there, then convert"
        )
    extra = {PROVENANCE_KEY: _provenance(provenance_metadata({}, report)[METADATA_KEY], plan.base, base_folder)}
    touched = {t.name for t in plan.tensors if not copied(t, plan)}
    if isinstance(plan.base, GGUFCheckpoint):
        output_spec = GGUFOutput(extra=extra, base=plan.base, touched=touched, requant=requant)
    else:
        output_spec = GGUFOutput(base_folder, outtype, extra, touched=touched)
    writer = GGUFModelWriter(output_spec)
    with AtomicOutput(output, is_dir=False, checked=checked) as out:
        written = write_model(
            plan, out.tmp.parent, "model", 0, device=device, progress=progress, single_file=out.tmp, writer=writer
        )
        report.warnings.extend(output_spec.warnings)
        report_nonfinite(written.nonfinite, report.warnings)
        out.commit()
