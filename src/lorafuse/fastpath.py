"""`lorafuse merge` without importing torch, for the most common case: plain PEFT LoRA into safetensors.

``import torch`` costs 1.1 s with a CPU build and about 4 s with a CUDA build, often more than the merge itself
(docs/performance.md). When the CLI has a prefill (io/prefill.py: the base is a local folder of safetensors, dtype
kept, safetensors output) and every adapter is a plain PEFT LoRA whose tensors land by exact name on 2-D float
weights, this module does the merge with numpy: the same fp32 row-block math as the engine (W + sum of scale * B @ A,
rounded once, round-to-nearest-even), written over the prefilled shards.

It never decides anything the torch path would report: any doubt (an option it does not cover, a config flag, a
name that needs matching, NaN/Inf or all-zero lora_B, a merged value beyond the output range, a target module that
matched nothing, NaN/Inf in a base tensor no adapter touches) returns None before or during the merge, and the
torch engine then merges (and reports) the usual way, rewriting every tensor the adapters touch over the same
prefill. A bad adapter_config.json gets the torch path's verdict: both read it with ``peft_flags.load_config``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conv1d import is_conv1d_model
from .errors import LorafuseError
from .io.extra_files import copy_extra_files, read_json
from .io.layout import write_index
from .io.output import AtomicOutput, refuse_overlap
from .io.prefill import Prefill
from .io.safetensors_header import RawEntry, read_raw_header
from .math_threads import fast_path_threads
from .peft_flags import CONFIG_NAME, UNSUPPORTED_FLAGS, AdapterConfig, load_config, lora_scaling, strengths
from .report import PROVENANCE_NAME, MergeReport, sha256_file
from .sources import resolve_merge_inputs
from .targets import EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING, unmatched_targets

# adapter_config.json settings that change the merge in ways only the torch path handles (formats/peft.py reads
# these; every other key is ignored there too, so ignoring it here gives the same merge).
TORCH_ONLY_FLAGS = (
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "trainable_token_indices",
    "ensure_weight_tying",
    *UNSUPPORTED_FLAGS,  # refused there, with the reason
)
KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
FLOAT_CODES = ("BF16", "F16", "F32")
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ROW_BLOCK_BYTES = 4 << 20  # fp32 rows per block, as the torch engine (engine.py)
F16_MAX = 65504.0


class Fallback(Exception):
    """The torch path must take this merge (never shown to the user)."""


@dataclass
class _Lora:
    module: str
    a: RawEntry
    b: RawEntry
    path: Path  # adapter_model.safetensors
    scale: float


def fast_merge(
    base: str, adapters: list[str], output: str, weights: list[float] | None, prefill: Prefill
) -> MergeReport | None:
    """Merge as ``lorafuse.merge`` would, into ``prefill``'s folder, and commit it; None: the torch path must."""
    started = time.perf_counter()
    # One BLAS thread per numpy call: the merge's own threads share the cores (read when numpy loads its BLAS).
    saved = {var: os.environ.get(var) for var in BLAS_THREAD_VARS}
    for var in BLAS_THREAD_VARS:
        os.environ.setdefault(var, "1")
    try:
        import numpy as np  # noqa: F401  (optional: the torch path needs none)
    except ImportError:
        return None
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters) or not Path(base).is_dir():
        return None
    try:  # the prefill checked the output already; an adapter must never be replaced either
        refuse_overlap(Path(output), [Path(base), *(Path(a) for a in adapters)])
    except LorafuseError:
        return None  # the torch path refuses it, with its message
    try:
        loras, files = _read_adapters(adapters, weights)
        plan = _plan(loras, prefill, read_json(Path(base) / "config.json"))
        _merge_all(plan, prefill)
    except (Fallback, LorafuseError):
        return None  # a bad file or a failed copy: the torch path reports it in its words
    sources = resolve_merge_inputs(base, adapters)
    try:
        return _finish(base, adapters, output, weights, prefill, plan, files, sources, started)
    finally:
        sources.cleanup()


def _read_adapters(adapters: list[str], weights: list[float]) -> tuple[list[list[_Lora]], list[Path]]:
    """Every adapter's LoRA modules, or Fallback when one is anything but plain PEFT LoRA with exact names."""
    loras: list[list[_Lora]] = []
    files: list[Path] = []
    for text, weight in zip(adapters, strengths(weights, "--weight")):
        folder = Path(text)
        config = adapter_config(folder)
        path = folder / "adapter_model.safetensors"
        if not path.is_file():
            raise Fallback
        entries, _ = read_raw_header(path)
        modules: dict[str, dict[str, RawEntry]] = {}
        for entry in entries:
            match = KEY_RE.match(entry.name)
            if match is None or entry.dtype not in FLOAT_CODES:
                raise Fallback
            modules.setdefault(match["module"], {})[match["kind"]] = entry
        found: list[_Lora] = []
        for module, pair in modules.items():
            if set(pair) != {"A", "B"} or len(pair["A"].shape) != 2 or len(pair["B"].shape) != 2:
                raise Fallback
            rank = pair["A"].shape[0]
            if 0 in pair["A"].shape or 0 in pair["B"].shape:
                raise Fallback  # empty factors (rank 0, or a zero-width weight): the torch path handles them
            scale = lora_scaling(config.lora_alpha, rank, config.use_rslora) * weight
            if not math.isfinite(scale):
                raise Fallback  # a huge alpha times a huge weight: the torch path names it
            found.append(_Lora(module, pair["A"], pair["B"], path, scale))
        if not found or unmatched_targets(str(folder), config.target_modules, list(modules)):
            raise Fallback
        loras.append(found)
        files.append(path)
    return loras, files


def adapter_config(folder: Path) -> AdapterConfig:
    """``folder``'s adapter_config.json, read and checked by the torch path's own reader (the same verdicts, the
    same errors: ``fast_merge`` then leaves them to the torch path); Fallback for settings only it merges."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise Fallback
    config = load_config(path)
    if config.bias != "none" or any(config.raw.get(f) not in (None, False, [], {}, 0, "") for f in TORCH_ONLY_FLAGS):
        raise Fallback
    return config


@dataclass
class _Target:
    name: str
    dtype: str
    shape: tuple[int, int]
    loras: list[_Lora]


def _plan(loras: list[list[_Lora]], prefill: Prefill, base_config: dict[str, Any] | None) -> list[_Target]:
    """Touched base tensors in output order, each with its LoRAs in adapter order; Fallback on any mismatch."""
    if base_config is None or is_conv1d_model(base_config):
        raise Fallback  # Conv1D layers and tied-head rules are the torch plan's
    nested = [base_config] + [v for v in base_config.values() if isinstance(v, dict)]
    if any("quantization_config" in c for c in nested) or any(s.dtype not in FLOAT_CODES for s in prefill.slots):
        raise Fallback  # quantized or unusual tensors: the torch plan dequantizes or converts them
    slots = {slot.name: slot for slot in prefill.slots}
    per_target: dict[str, list[_Lora]] = {}
    for adapter in loras:
        for lora in adapter:
            slot = slots.get(f"{lora.module}.weight")
            if slot is None or slot.dtype not in FLOAT_CODES or len(slot.shape) != 2:
                raise Fallback
            rows, cols = slot.shape
            if lora.a.shape[1] != cols or tuple(lora.b.shape) != (rows, lora.a.shape[0]):
                raise Fallback
            per_target.setdefault(slot.name, []).append(lora)
    if any(name.endswith((*EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING)) for name in per_target):
        raise Fallback  # embeddings and heads: tying decisions belong to the torch plan
    return [_Target(s.name, s.dtype, tuple(s.shape), per_target[s.name]) for s in prefill.slots if s.name in per_target]


def _load_f32(path: Path, entry: RawEntry):
    """An adapter tensor as an fp32 numpy array; Fallback on NaN/Inf."""
    import numpy as np

    with open(path, "rb") as handle:
        handle.seek(entry.offset)
        raw = handle.read(entry.nbytes)
    if len(raw) != entry.nbytes:
        raise Fallback  # truncated: the torch path names the file
    values = _decode(np.frombuffer(raw, dtype=np.uint8), entry.dtype).reshape(entry.shape)
    if not np.isfinite(values).all():
        raise Fallback
    return values


def _decode(raw, code: str):
    """Little-endian bytes of a BF16/F16/F32 tensor as fp32 (bf16: the top half of an fp32)."""
    import numpy as np

    if code == "F32":
        return raw.view("<f4").astype(np.float32, copy=True)
    if code == "F16":
        return raw.view("<f2").astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _merge_all(plan: list[_Target], prefill: Prefill) -> None:
    """Merge every touched tensor (threads: numpy releases the GIL in its loops and matrix products)."""
    for target in plan:  # every adapter tensor checked before anything is written (NaN/Inf, all-zero lora_B)
        for lora in target.loras:
            _load_f32(lora.path, lora.a)
            if not _load_f32(lora.path, lora.b).any():
                raise Fallback  # no effect: the torch path warns
    prefill.used = True  # its files are the output now (as when the engine adopts them)
    fds = {name: os.open(prefill.tmp / name, os.O_WRONLY) for name in prefill.names}
    slots = {slot.name: slot for slot in prefill.slots}
    try:
        with ThreadPoolExecutor(fast_path_threads()) as pool:
            jobs = [pool.submit(_merge_one, t, slots[t.name], prefill, fds) for t in plan]
            touched = {t.name for t in plan}
            untouched = [slot for slot in prefill.slots if slot.name not in touched]
            jobs += [pool.submit(_check_finite, group, prefill) for group in _scan_groups(untouched)]
            for job in jobs:
                job.result()
    finally:
        for fd in fds.values():
            os.close(fd)


# NaN/Inf as bit patterns (sign, all-ones exponent): a negative one is at least the first value as an unsigned
# integer, a positive one at least the second as a signed one. Two max reductions per chunk, no temporaries.
NONFINITE_BITS = {"BF16": (16, 0xFF80, 0x7F80), "F16": (16, 0xFC00, 0x7C00), "F32": (32, 0xFF800000, 0x7F800000)}
SCAN_CHUNK = 1 << 20  # bytes per read, reused: stays in the CPU cache for both reductions
SCAN_GROUP_BYTES = 256 << 20  # untouched tensors per job: the pool's threads share a large single-file model


def _scan_groups(slots: list[Any]) -> list[list[Any]]:
    """Untouched slots in runs of about ``SCAN_GROUP_BYTES``, in output order."""
    groups: list[list[Any]] = [[]]
    size = 0
    for slot in slots:
        if size >= SCAN_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += slot.nbytes
    return [g for g in groups if g]


def _check_finite(slots: list[Any], prefill: Prefill) -> None:
    """Fallback when an untouched base tensor holds NaN or Inf: the torch path copies it as well, and says so.

    The prefill copies these bytes with the kernel and never reads them; this reads them once more (about 8 GB/s
    per thread on cached pages, beside the merge's own threads), the price of never shipping a broken base silently.
    """
    import numpy as np

    raw = np.empty(SCAN_CHUNK, dtype=np.uint8)
    fds: dict[Path, int] = {}
    try:
        for slot in slots:
            bits, negative, positive = NONFINITE_BITS[slot.dtype]
            path, offset = prefill.source(slot.name)
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            for start in range(0, slot.nbytes, SCAN_CHUNK):
                size = min(SCAN_CHUNK, slot.nbytes - start)
                chunk = raw[:size]
                if os.preadv(fd, [chunk], offset + start) != size:
                    raise Fallback  # the file changed or is truncated: the torch path names it
                unsigned = chunk.view(f"<u{bits // 8}")
                if int(unsigned.max()) >= negative or int(unsigned.view(f"<i{bits // 8}").max()) >= positive:
                    raise Fallback
    finally:
        for fd in fds.values():
            os.close(fd)


class _Buffers:
    """One thread's reused block buffers (fresh 4 MB arrays per block would cost page faults every time)."""

    def __init__(self, rows: int, cols: int):
        import numpy as np

        self.shape = (rows, cols)
        self.raw = np.empty(rows * cols * 4, dtype=np.uint8)  # the base rows as read
        self.block = np.empty((rows, cols), dtype=np.float32)  # fp32 math
        self.product = np.empty((rows, cols), dtype=np.float32)  # one LoRA product
        self.bits = np.empty((rows, cols), dtype=np.uint32)  # rounding to bf16
        self.exponents = np.empty((rows, cols), dtype=np.uint16)  # its overflow check
        self.out = np.empty(rows * cols * 4, dtype=np.uint8)  # the rounded rows as written


_local = threading.local()


def _buffers(rows: int, cols: int) -> _Buffers:
    held = getattr(_local, "buffers", None)
    if held is None or held.shape[1] != cols or held.shape[0] < rows:
        held = _local.buffers = _Buffers(rows, cols)
    return held


def _merge_one(target: _Target, slot: Any, prefill: Prefill, fds: dict[str, int]) -> None:
    """One tensor in row blocks: read the base rows, add the LoRA products in fp32, round once, write in place."""
    import numpy as np

    # Loaded here, one tensor's factors at a time: memory does not grow with the adapters.
    factors = [(_load_f32(lo.path, lo.b) * np.float32(lo.scale), _load_f32(lo.path, lo.a)) for lo in target.loras]

    rows, cols = target.shape
    code = target.dtype
    elem = 4 if code == "F32" else 2
    step = max(1, min(rows, ROW_BLOCK_BYTES // (cols * 4)))
    buf = _buffers(step, cols)
    path, offset = prefill.source(target.name)
    out_fd = fds[prefill.names[slot.shard]]
    prefill.wait_for(target.name)  # the prefill's copy of this slot is done: writing over it is final
    with open(path, "rb", buffering=0) as src:
        for start in range(0, rows, step):
            n = min(rows, start + step) - start
            nbytes = n * cols * elem
            raw = buf.raw[:nbytes]
            if os.preadv(src.fileno(), [raw], offset + start * cols * elem) != nbytes:
                raise Fallback  # the file changed or is truncated: the torch path names it
            block = buf.block[:n]
            if code == "BF16":  # bf16 is the top half of an fp32
                np.left_shift(raw.view("<u2").reshape(n, cols), 16, out=block.view(np.uint32), dtype=np.uint32)
            else:
                np.copyto(block, raw.view("<f2" if code == "F16" else "<f4").reshape(n, cols))
            for scaled_b, a in factors:
                np.matmul(scaled_b[start : start + n], a, out=buf.product[:n])
                block += buf.product[:n]
            data = _round_into(block, code, buf, n)
            if os.pwrite(out_fd, data, slot.offset + start * cols * elem) != data.nbytes:
                raise OSError(f"short write to {prefill.tmp / prefill.names[slot.shard]}")


def _round_into(block, code: str, buf: _Buffers, n: int):
    """``block`` rounded once (to nearest, ties to even) to ``code``'s bytes in ``buf.out``; Fallback for a value
    that is NaN, Inf or beyond the output's range (the torch path reports it)."""
    import numpy as np

    cols = block.shape[1]
    if code == "F32":
        if not np.isfinite(block.min() + block.max()):  # NaN propagates; Inf shows (or overflows the sum)
            raise Fallback
        return block
    out = buf.out[: n * cols * 2]
    if code == "F16":
        peak = max(-float(block.min()), float(block.max()))
        if not peak <= F16_MAX:  # also NaN
            raise Fallback
        np.copyto(out.view("<f2").reshape(n, cols), block, casting="same_kind")
        return out
    bits, rounded = block.view(np.uint32), buf.bits[:n]
    np.right_shift(bits, 16, out=rounded)
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits  # below 2**32 for every finite value; NaN/Inf keep an all-ones exponent
    rounded >>= 16
    halves = out.view("<u2").reshape(n, cols)
    np.copyto(halves, rounded, casting="unsafe")
    exponents = buf.exponents[:n]
    np.bitwise_and(halves, 0x7F80, out=exponents)
    if int(exponents.max()) == 0x7F80:  # all exponent bits set: Inf or NaN after rounding
        raise Fallback
    return out


def _finish(
    base: str,
    adapters: list[str],
    output: str,
    weights: list[float],
    prefill: Prefill,
    plan: list[_Target],
    files: list[Path],
    sources: Any,
    started: float,
) -> MergeReport:
    """Index, the base's other files, provenance, then the atomic rename (as merger._write does)."""
    prefill.finish()
    index = f"{prefill.prefix}.safetensors.index.json" if len(prefill.names) > 1 else None
    report = MergeReport(
        base=str(sources.base),
        adapters=[
            {"path": str(a), "weight": w, "format": "peft", "files": {f.name: sha256_file(f)}}
            for a, w, f in zip(sources.adapters, weights, files)
        ],
        output=str(Path(output)),
        dtype="auto",
        format="safetensors",
        tensors_total=len(prefill.slots),
        tensors_touched=len(plan),
        total_bytes=sum(slot.nbytes for slot in prefill.slots),
        files=list(prefill.names) + ([index] if index else []),
        sources=sources.provenance,
        engine="numpy",
    )
    # The final rename replaces only what the prefill's check found at the output (io/output.py).
    with AtomicOutput(Path(output), adopt=True, checked=prefill.checked) as out:
        if out.tmp != prefill.tmp:
            raise OSError(f"the prefilled folder {prefill.tmp} is not the output's temporary folder {out.tmp}")
        if index:
            write_index(out.tmp / index, list(prefill.slots), list(prefill.names))
        report.copied_files = copy_extra_files(
            Path(base), out.tmp, prefill.base_files, {PROVENANCE_NAME}, warnings=report.warnings
        )
        report.seconds = time.perf_counter() - started
        (out.tmp / PROVENANCE_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        out.commit()
    return report
