"""``lorafuse.extract``: the difference between a tuned model and its base, as a LoRA adapter.

The two checkpoints are streamed tensor by tensor (never more than one pair in memory): unchanged tensors are
recognised from their bytes and skipped, and every changed weight of 2 or more dimensions is factorised to rank R
(randomized SVD by default, optionally a dynamic rank holding a fraction of the difference's energy). Output
formats: a PEFT adapter folder, the ``diffusion_model.`` single file, or a kohya single file. In the single-file
layouts (the seed ``lora-extractor``'s) 1-D and small tensors are stored as full differences; in a PEFT adapter
what a LoRA cannot hold (1-D norms and biases beyond ``lora_bias``, other parameters) is left out and reported with
its share of the change, unless ``keep_full`` names it (then its module is a ``modules_to_save`` entry). With
``serving="vllm"`` the adapter holds only what vLLM serves (serving.py), and the rest is left out and reported.
The math runs on numpy (fp32, bf16 through ml_dtypes), on the CPUs free for it (blas_threads.py); torch is
imported only for ``--device cuda`` (the SVDs), a ``.pt`` output and pickled inputs.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .arrays import (
    F32,
    F64,
    decode_f32,
    dtype_of,
    frobenius_norm,
    is_float,
    parse_dtype,
    round_to,
    short_name,
    squared_norm,
)
from .blas_threads import BlasPool
from .conv1d import is_conv1d_weight
from .errors import AdapterError, LorafuseError, NonFiniteError
from .formats.peft_writer import write_adapter_files, write_safetensors
from .formats.registry import StoredNames, get_format, writer_of
from .io.checkpoint import Checkpoint, open_model
from .io.extra_files import read_json
from .io.output import AtomicOutput, check_output
from .io.safetensors_file import TensorInfo, pread_into
from .io.spool import SpoolWriter
from .progress import ByteBar
from .serving import (
    VLLM_DEFAULT_MAX_LORA_RANK,
    VLLM_VERSION,
    VllmArchitecture,
    architecture_refusal,
    check_max_lora_rank,
    check_vllm_path,
    vllm_architecture,
)
from .targets import EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING
from .torch_bridge import check_device, require_torch, to_numpy, to_torch

log = logging.getLogger("lorafuse")

SINGLE_FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
PICKLE_OUTPUT_SUFFIXES = (".pt", ".pth")
PEFT_PREFIX = "base_model.model."
COMPARE_CHUNK = 32 << 20  # tensors up to this size are read whole, once, for the comparison and the difference
DIFF_SLICE = 1 << 20  # elements converted, differenced and summed at a time (stays in cache between the steps)
PRODUCT_STEP = 64  # rows or columns: the products with the whole matrix are split over threads in multiples of this
FIRST_CHUNK = 1 << 20  # larger ones are compared in chunks, the first one small: a changed tensor differs early


@dataclass
class TensorResult:
    """What extraction did with one base tensor."""

    name: str
    kind: str  # lora, diff, left_out (changed but not in the adapter), similar, tied, skipped, failed
    shape: tuple[int, ...]
    rank: int = 0
    rel_error: float = 0.0  # ||delta - stored|| / ||delta|| (1 for a tensor left out)
    delta_norm: float = 0.0
    share: float = 0.0  # ||delta||^2 / the sum over every changed tensor: this tensor's share of the change
    note: str = ""
    passes: int = 0  # randomized SVD: products of the whole difference with a thin matrix (0: exact or none)


@dataclass
class ExtractReport:
    """Statistics of an extraction (the old script's counters plus approximation errors)."""

    base: str
    tuned: str
    output: str
    format: str
    rank: int
    processed: int = 0
    direct_diff: int = 0
    lora: int = 0
    skipped: int = 0
    similar: int = 0
    failed: int = 0
    tied: int = 0
    left_out: int = 0
    rel_error: float = 0.0  # overall: sqrt(sum ||delta - stored||^2) / sqrt(sum ||delta||^2)
    left_out_error: float = 0.0  # the part of rel_error the tensors left out cost: sqrt(sum of their shares)
    adapter_bytes: int = 0
    tensors_written: int = 0
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors: list[TensorResult] = field(default_factory=list)
    seconds: float = 0.0
    lorafuse_version: str = __version__
    serving: dict[str, Any] | None = None  # with serving="vllm": serving.ServingVerdict.to_dict() of the output

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def count(self, result: TensorResult) -> None:
        self.tensors.append(result)
        self._tally(result.kind, 1)

    def _tally(self, kind: str, step: int) -> None:
        attr = {"diff": "direct_diff"}.get(kind, kind)
        setattr(self, attr, getattr(self, attr) + step)
        if kind in ("lora", "diff", "failed", "left_out"):
            self.processed += step

    def reclassify(self, name: str, kind: str, note: str, rel_error: float = 0.0) -> None:
        """What the end of a PEFT extraction decided for a tensor counted before (a LoRA stored whole, a bias
        left out)."""
        for result in self.tensors:
            if result.name == name:
                self._tally(result.kind, -1)
                self._tally(kind, 1)
                result.kind, result.rank, result.rel_error, result.note = kind, 0, rel_error, note

    def finish_errors(self) -> None:
        """The overall error, each changed tensor's share of the change and what the tensors left out cost."""
        total = sum(t.delta_norm**2 for t in self.tensors)
        for t in self.tensors:
            t.share = t.delta_norm**2 / total if total > 0 else 0.0
        self.rel_error = overall_error(self.tensors)
        self.left_out_error = math.sqrt(sum(t.share for t in self.tensors if t.kind == "left_out"))


@dataclass
class Factors:
    """delta ~= up @ down (``up``: out x k, ``down``: k x in), fp32 numpy arrays."""

    up: np.ndarray
    down: np.ndarray
    singular_values: np.ndarray
    passes: int = 0  # products of the whole matrix with a thin one (randomized SVD); 0 for a full SVD


# --power-iters auto: stop once the predicted (error / optimal)^2 - 1 is at most this, i.e. an error within ~1.0025x
# of optimal: a quarter of the 1.01x budget, as the prediction is a mean (the actual excess was up to 1.7x it over
# 60 seeds on a borderline gap, median 0.6x).
AUTO_TOLERANCE = 0.005
AUTO_MAX_PASSES = 6  # never more work than --power-iters 2


def parse_power_iters(value: int | str) -> int | str:
    """``"auto"`` or a count of power iterations (``int``, or its decimal string)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0 or isinstance(value, (bool, float)):
        raise LorafuseError(f"--power-iters must be 'auto' or a count >= 0 (got {value!r})")
    return count


def predicted_excess(s: np.ndarray, k: int, oversample: int, exponent: int) -> float:
    """Predicted ``(error / optimal)^2 - 1`` of the rank-``k`` truncation of a randomized sketch.

    ``s``: the sketch's singular values (``k + oversample`` of them); ``exponent``: the power of ``A`` whose range
    was sampled (1 for a plain sketch, 2q + 1 after q power iterations; each further product of the matrix with the
    last basis adds 1). First-order form of the randomized SVD error bounds (Halko, Martinsson & Tropp 2011, 10.5;
    Gu 2015): the top direction j leans towards each direction i > k by a squared angle of about
    ``(s_i / s_j)^(2 * exponent) / (oversample - 1)``, which costs ``s_j^2 - s_i^2`` of captured energy, so the
    excess over the optimal error ``sum_{i>k} s_i^2`` is at most ``sum_{j<k} max_{y <= (s_k / s_j)^2}
    (1 - y) y^(exponent - 1) / (oversample - 1)`` times it. With exponent 1 that is ``k / (oversample - 1)``
    (the bound for no power iteration, whatever the spectrum); with a spectral gap it falls as
    ``(s_k / s_j)^(2 * exponent - 2)``; on a flat spectrum it stays large.
    """
    s = np.asarray(s, dtype=F64).reshape(-1)
    if oversample < 2 or s.size <= k:
        return math.inf
    if exponent <= 1:
        return k / (oversample - 1)
    top = s[:k]
    x = np.where(top > 0, np.square(s[k] / np.maximum(top, np.finfo(F64).tiny)), 0.0).clip(max=1.0)
    y = x.clip(max=(exponent - 1) / exponent)  # (1 - y) y^(e-1) peaks at y = (e-1)/e
    return float(((1 - y) * y ** (exponent - 1)).sum()) / (oversample - 1)


def low_rank(
    matrix: np.ndarray,
    rank: int,
    *,
    exact: bool = False,
    energy: float | None = None,
    oversample: int = 8,
    power_iters: int | str = "auto",
    seed: int = 0,
    sq_norm: float | None = None,
    device: str = "cpu",
    threads: BlasPool | None = None,
) -> Factors:
    """Best rank-``rank`` factors of a 2-D fp32 ``matrix`` (randomized SVD unless ``exact``).

    With ``energy``, keeps the smallest rank whose singular values hold that fraction of ``||matrix||_F^2``
    (never more than ``rank``; ``sq_norm``, when given, is that squared norm). The singular values are split evenly:
    up = U sqrt(S), down = sqrt(S) V^T. ``power_iters``: a count q (2q + 2 products with the matrix), or ``"auto"``:
    after each product from the third on, stop when :func:`predicted_excess` is at most ``AUTO_TOLERANCE`` (at most
    ``AUTO_MAX_PASSES`` products). ``Factors.passes`` says how many products were made. The random sketch is drawn
    from numpy's generator seeded with ``seed``, on every device. ``device``: ``cpu`` (numpy, on ``threads``: the
    free CPUs) or a CUDA device (torch).
    """
    power_iters = parse_power_iters(power_iters)
    if device != "cpu":
        return _low_rank(matrix, rank, exact, energy, oversample, power_iters, seed, sq_norm, _TorchOps(device))
    own = threads is None
    threads = threads or BlasPool()
    try:
        with threads.one_thread():
            return _low_rank(matrix, rank, exact, energy, oversample, power_iters, seed, sq_norm, _NumpyOps(threads))
    finally:
        if own:
            threads.close()


def _low_rank(
    matrix: np.ndarray,
    rank: int,
    exact: bool,
    energy: float | None,
    oversample: int,
    power_iters: int | str,
    seed: int,
    sq_norm: float | None,
    ops: _NumpyOps | _TorchOps,
) -> Factors:
    m, n = matrix.shape
    k_max = max(1, min(rank, m, n))
    width = min(k_max + oversample, m, n)
    passes = 0
    if exact or width >= min(m, n):
        u, s, vh = ops.full_svd(ops.load(matrix))
    else:
        u, s, vh, passes = _randomized_svd(ops.load(matrix), k_max, width, power_iters, seed, ops)
    values = ops.host(s)
    k = k_max
    if energy is not None:
        total = frobenius_norm(matrix) ** 2 if sq_norm is None else sq_norm
        if total > 0:
            kept = np.cumsum(np.square(values.astype(F64))) / total
            k = min(k_max, int((kept < energy).sum()) + 1)
    root = s[:k] ** 0.5
    return Factors(ops.host(u[:, :k] * root), ops.host(root[:, None] * vh[:k]), values[:k], passes)


def _gaussian(rows: int, cols: int, seed: int) -> np.ndarray:
    """The sketch's test matrix: fp32 standard normal values from numpy's generator (the same on every device)."""
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=F32)


class _NumpyOps:
    """The randomized SVD's steps on numpy: the products with the whole matrix split over the free CPUs (each span
    one BLAS call on its own thread), the factorisations of thin matrices on one thread."""

    def __init__(self, threads: BlasPool):
        self.threads = threads

    def load(self, matrix: np.ndarray) -> np.ndarray:
        return matrix

    def gaussian(self, rows: int, cols: int, seed: int) -> np.ndarray:
        return _gaussian(rows, cols, seed)

    def times(self, matrix: np.ndarray, thin: np.ndarray) -> np.ndarray:
        """``matrix @ thin``, block of rows by block of rows."""
        out = np.empty((matrix.shape[0], thin.shape[1]), dtype=F32)

        def span(_index: int, start: int, stop: int) -> float:
            np.matmul(matrix[start:stop], thin, out=out[start:stop])
            return 0.0

        self.threads.run(self.threads.spans(matrix.shape[0], PRODUCT_STEP), span)
        return out

    def times_t(self, thin: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """``thin.T @ matrix``, block of columns by block of columns."""
        out = np.empty((thin.shape[1], matrix.shape[1]), dtype=F32)

        def span(_index: int, start: int, stop: int) -> float:
            np.matmul(thin.T, matrix[:, start:stop], out=out[:, start:stop])
            return 0.0

        self.threads.run(self.threads.spans(matrix.shape[1], PRODUCT_STEP), span)
        return out

    def qr(self, matrix: np.ndarray) -> np.ndarray:
        return np.linalg.qr(matrix).Q

    def svd(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.linalg.svd(matrix, full_matrices=False))  # type: ignore[return-value]

    def full_svd(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self.threads.blas():  # one LAPACK call lorafuse cannot split: BLAS may use the free CPUs
            return self.svd(matrix)

    def host(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)


class _TorchOps:
    """The same steps on a CUDA device (the torch extra); the results come back as numpy arrays."""

    def __init__(self, device: str):
        self.torch = require_torch(f"--device {device}")
        self.device = device

    def load(self, matrix: np.ndarray) -> Any:
        if not matrix.flags.c_contiguous and matrix.T.flags.c_contiguous:  # a transposed view: moved as it is
            return to_torch(matrix.T).to(self.device).T
        return to_torch(np.ascontiguousarray(matrix)).to(self.device)

    def gaussian(self, rows: int, cols: int, seed: int) -> Any:
        return self.load(_gaussian(rows, cols, seed))

    def times(self, matrix: Any, thin: Any) -> Any:
        return matrix @ thin

    def times_t(self, thin: Any, matrix: Any) -> Any:
        return thin.T @ matrix

    def qr(self, matrix: Any) -> Any:
        return self.torch.linalg.qr(matrix).Q

    def svd(self, matrix: Any) -> tuple[Any, Any, Any]:
        return tuple(self.torch.linalg.svd(matrix, full_matrices=False))  # type: ignore[return-value]

    full_svd = svd

    def host(self, tensor: Any) -> np.ndarray:
        return np.ascontiguousarray(to_numpy(tensor))


def _randomized_svd(
    matrix: Any, k: int, width: int, power_iters: int | str, seed: int, ops: _NumpyOps | _TorchOps
) -> tuple[Any, Any, Any, int]:
    """(U, S, V^T, passes) of a rank-``width`` randomized SVD, alternating sides.

    The sketch Q = orth(A Omega) is followed by products that alternate sides: B = Q^T A (the approximation
    Q B), then Y = A P with P = orth(B^T) (the approximation Y P^T), then B = orth(Y)^T A, and so on. Product t
    samples the range of A's (t - 1)-th power, and ends a candidate; 2q + 2 products are the textbook randomized SVD
    with q power iterations, while ``auto`` may also stop after an odd number (a half iteration).
    """
    m, n = matrix.shape
    auto = power_iters == "auto"
    max_passes = AUTO_MAX_PASSES if auto else 2 * int(power_iters) + 2
    omega = ops.gaussian(n, width, seed)
    basis = ops.qr(ops.times(matrix, omega))  # m x width
    on_left, passes = True, 1
    while True:
        product = ops.times_t(basis, matrix) if on_left else ops.times(matrix, basis)  # width x n, or m x width
        passes += 1
        # A plain sketch (2 products) is never judged good enough: its bound is k / (oversample - 1) whatever the
        # spectrum, so the SVD is only computed where the answer can be "stop".
        if passes >= max_passes or (auto and passes >= 3):
            u, s, vh = ops.svd(product)
            if passes >= max_passes or predicted_excess(ops.host(s), k, width - k, passes - 1) <= AUTO_TOLERANCE:
                if on_left:
                    return basis @ u, s, vh, passes
                return u, s, vh @ basis.T, passes
            basis = vh.T if on_left else u  # the SVD's singular vectors are an orthonormal basis of the product
        else:
            basis = ops.qr(product.T if on_left else product)
        on_left = not on_left


def _tensor_seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + seed) & 0x7FFFFFFF


@functools.cache
def _compare_buffers() -> tuple[np.ndarray, np.ndarray]:
    # Reused for every comparison: fresh 32 MB buffers per chunk would cost page faults on every read.
    return np.empty(COMPARE_CHUNK, dtype=np.uint8), np.empty(COMPARE_CHUNK, dtype=np.uint8)


def _equal_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte equality of two 1-D uint8 arrays (compared as 8-byte words: 10x faster than memoryview ``==``)."""
    words = a.size // 8 * 8
    return np.array_equal(a[:words].view(np.uint64), b[:words].view(np.uint64)) and np.array_equal(a[words:], b[words:])


def _raw_bytes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def _same_values(base: Checkpoint, tuned: Checkpoint, bname: str, tname: str) -> bool:
    """True when the two tensors hold identical values (bytes compared in chunks for safetensors)."""
    bi, ti = base.infos[bname], tuned.infos[tname]
    if bi.code == ti.code and bi.offset >= 0 and ti.offset >= 0:
        if bi.nbytes != ti.nbytes:
            return False
        bfd, tfd = base.fd(bi.path), tuned.fd(ti.path)
        left, right = _compare_buffers()
        start, size = 0, FIRST_CHUNK
        while start < bi.nbytes:
            size = min(size, bi.nbytes - start)
            a, b = left[:size], right[:size]
            pread_into(bfd, memoryview(a), bi.offset + start, bi.path)
            pread_into(tfd, memoryview(b), ti.offset + start, ti.path)
            if not _equal_bytes(a, b):
                return False
            start, size = start + size, COMPARE_CHUNK
        return True
    a, b = base.array(bname), tuned.array(tname)
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        return _equal_bytes(_raw_bytes(a), _raw_bytes(b))
    if is_float(a.dtype) and is_float(b.dtype):
        return bool(np.array_equal(_f32(a), _f32(b)))
    return bool(np.array_equal(a, b))


def _f32(values: np.ndarray) -> np.ndarray:
    """A float tensor's values in fp32 (a new array)."""
    return decode_f32(values, values.dtype)


class _Workspace:
    """Buffers reused from tensor to tensor: a fresh large array costs a page fault per 4 KiB on every use.

    Holds the two raw tensors and the fp32 difference of the largest changed tensor so far (about one tensor pair,
    as before, but allocated once), plus one slice of scratch per thread. The element-wise work is split over
    ``threads`` (measured on 2 cores: the difference of a 6144 x 2048 bf16 pair took 15.2 ms on one thread, 7.8 ms
    on two).
    """

    def __init__(self, threads: BlasPool | None = None) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self.threads = threads or BlasPool()  # sized to the free CPUs as the stream goes
        self._pinned = self.threads.one_thread()

    def __enter__(self) -> _Workspace:
        """numpy's BLAS pinned to one thread while the workspace is in use: its threads split the work instead."""
        self._pinned.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._pinned.__exit__(None, None, None)
        self.threads.close()

    def take(self, key: str, size: int, dtype: np.dtype) -> np.ndarray:
        """A 1-D array of ``size`` elements, contents undefined (valid until the next ``take`` of ``key``)."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            self._buffers.pop(key, None)  # freed before the larger one is allocated
            buffer = self._buffers[key] = np.empty(max(size, 1), dtype=dtype)
        return buffer[:size]

    def scratch(self, count: int, size: int) -> list[np.ndarray]:
        """``count`` fp32 scratch slices of ``size`` elements, one per span."""
        return [self.take(f"slice{i}", size, F32) for i in range(count)]

    def difference(self, tuned: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, float]:
        """``tuned - base`` in fp32 (exact for two bf16 or fp16 values of similar size) in the ``delta`` buffer,
        and its squared Frobenius norm (summed in fp64).

        Converted, subtracted and summed slice by slice, each step on values still in the cache.
        """
        size = tuned.size
        delta = self.take("delta", size, F32)
        tuned_flat, base_flat = tuned.reshape(-1), base.reshape(-1)
        spans = self.threads.spans(size, DIFF_SLICE)
        buffers = self.scratch(len(spans), min(DIFF_SLICE, size))

        def span(index: int, start: int, stop: int) -> float:
            total = 0.0
            with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf: refused by the caller, naming the tensor
                for low in range(start, stop, DIFF_SLICE):
                    high = min(low + DIFF_SLICE, stop)
                    part, other = delta[low:high], buffers[index][: high - low]
                    decode_f32(tuned_flat[low:high], tuned.dtype, out=part)
                    decode_f32(base_flat[low:high], base.dtype, out=other)
                    np.subtract(part, other, out=part)
                    total += squared_norm(part)
            return total

        return delta.reshape(tuned.shape), self.threads.run(spans, span)

    def read(self, ckpt: Checkpoint, info: TensorInfo, key: str) -> np.ndarray:
        """The tensor ``info`` of ``ckpt``, read into the buffer ``key`` when it is stored raw (safetensors)."""
        if info.offset < 0:
            return ckpt.array(info.name)
        raw = self.take(key, info.nbytes, np.dtype(np.uint8))
        if info.nbytes:
            pread_into(ckpt.fd(info.path), memoryview(raw), info.offset, info.path)
        return raw.view(dtype_of(info.code)).reshape(info.shape)


def _compare_and_read(
    base: Checkpoint, tuned: Checkpoint, name: str, workspace: _Workspace
) -> tuple[bool, tuple[np.ndarray, np.ndarray] | None]:
    """(equal, the (tuned, base) arrays when they were read whole to be compared, else None).

    A changed tensor is then differenced from the bytes already read, instead of reading both files twice.
    """
    bi, ti = base.infos[name], tuned.infos[name]
    if bi.code == ti.code and bi.offset >= 0 and ti.offset >= 0 and bi.nbytes == ti.nbytes <= COMPARE_CHUNK:
        tuned_value, base_value = workspace.read(tuned, ti, "tuned"), workspace.read(base, bi, "base")
        if _equal_bytes(_raw_bytes(tuned_value), _raw_bytes(base_value)):
            return True, None
        return False, (tuned_value, base_value)
    return _same_values(base, tuned, name, name), None


def _embedding_key(keys: list[str]) -> str | None:
    found = [k for k in keys if k.endswith(EMBEDDING_SUFFIXES)]
    return found[0] if len(found) == 1 else None


def _module_of(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


@dataclass
class _PeftState:
    """What a PEFT adapter config needs to know, gathered while streaming."""

    ranks: dict[str, int] = field(default_factory=dict)  # LoRA module -> rank
    embeddings: set[str] = field(default_factory=set)
    conv1d: set[str] = field(default_factory=set)  # LoRA modules that are GPT-2 Conv1D layers (fan_in_fan_out)
    diffs: dict[str, np.dtype] = field(default_factory=dict)  # tensors stored whole (modules_to_save) -> dtype
    biases: dict[str, np.dtype] = field(default_factory=dict)  # changed biases: lora_B.bias where PEFT can merge it


def extract(
    base: str | Path,
    tuned: str | Path,
    output: str | Path,
    rank: int = 16,
    fmt: str = "peft",
    *,
    energy: float | None = None,
    exact_svd: bool = False,
    device: str = "cpu",
    min_params: int | None = None,
    diff_only: bool = False,
    dtype: str | None = "auto",
    oversample: int = 8,
    power_iters: int | str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    base_name: str | None = None,
    show_progress: bool | None = None,
    keep_full: Sequence[str] = (),
    serving: str | None = None,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
) -> ExtractReport:
    """Extract ``tuned - base`` as an adapter written to ``output``.

    ``fmt``: ``peft`` (an adapter folder), ``diffusion`` or ``kohya`` (a single ``.safetensors``/``.pt`` file;
    ``.safetensors`` is appended when the name has no such suffix). ``dtype``: ``auto`` stores LoRA factors in
    the tuned tensor's dtype and full differences in fp32 (so they round-trip exactly); or bf16/fp16/fp32 for all.
    ``power_iters``: ``"auto"`` (see :func:`low_rank`) or a fixed count of randomized-SVD power iterations.
    ``device``: where the SVDs run (``cuda`` needs the torch extra); the rest runs on numpy.
    ``min_params``: diffusion/kohya only (default 1,000,000): smaller tensors are stored as full differences; a
    PEFT adapter factorises every changed 2-D weight. ``keep_full``: tensor or module names (fnmatch patterns)
    whose changes are stored whole (PEFT: their modules in ``modules_to_save``). ``serving="vllm"``: write only
    what vLLM serves (ranks up to ``max_lora_rank``), leave the rest out and report it, and check the result.
    """
    started = time.perf_counter()
    names = writer_of(fmt).names  # a one-line error naming the formats lorafuse writes
    if rank < 1:
        raise LorafuseError(f"--rank must be at least 1 (got {rank})")
    min_params = _min_params(fmt, min_params)
    keep_full = tuple(keep_full)
    if serving is not None:
        _check_serving(serving, fmt, rank, max_lora_rank, keep_full, diff_only)
    if energy is not None and not 0 < energy <= 1:
        raise LorafuseError(f"--energy must be in (0, 1] (got {energy})")
    if oversample < 0:
        raise LorafuseError(f"--oversample must be at least 0 (got {oversample})")
    power_iters = parse_power_iters(power_iters)
    check_device(device)
    out_dtype = parse_dtype(dtype)
    base_path, tuned_path, output_path = Path(base), Path(tuned), Path(output)
    if fmt != "peft" and not output_path.name.endswith(SINGLE_FILE_SUFFIXES):
        output_path = output_path.with_name(output_path.name + ".safetensors")
    pickle = fmt != "peft" and output_path.suffix in PICKLE_OUTPUT_SUFFIXES
    if pickle:
        require_torch(f"a {output_path.suffix} output (a PyTorch pickle; use .safetensors without torch)")
    checked = check_output(output_path, overwrite, [base_path, tuned_path])

    base_ckpt, _prefix, _ = open_model(base_path)
    tuned_ckpt: Checkpoint | None = None
    report = ExtractReport(str(base_path), str(tuned_path), str(output_path), fmt, rank)
    try:
        tuned_ckpt, _tprefix, _ = open_model(tuned_path)
        base_only = [k for k in base_ckpt.keys() if k not in tuned_ckpt]
        tuned_only = [k for k in tuned_ckpt.keys() if k not in base_ckpt]
        if base_only:
            report.warnings.append(f"{len(base_only)} tensors only in the base model, e.g. {base_only[:3]}")
        if tuned_only:
            report.warnings.append(
                f"{len(tuned_only)} tensors only in the tuned model (not extracted), e.g. {tuned_only[:3]}"
            )
        is_dir = fmt == "peft"
        with AtomicOutput(output_path, is_dir=is_dir, checked=checked) as out:
            spool_dir = out.tmp if is_dir else out.tmp.parent
            spool = SpoolWriter(spool_dir / f".{output_path.name}.lorafuse-spool-{os.getpid()}")
            try:
                settings = _Settings(
                    rank, energy, exact_svd, device, min_params, diff_only, out_dtype, oversample, power_iters, seed
                )
                settings.base_config = read_json(base_path / "config.json") if base_path.is_dir() else None
                settings.keep_full = keep_full
                settings.tied_embedding = _tied_embedding(settings.base_config, base_ckpt.keys())
                if serving is not None:
                    settings.serving = _serving_architecture(settings.base_config, base_path)
                peft_state = _stream(base_ckpt, tuned_ckpt, spool, names, settings, report, show_progress)
                if is_dir:
                    config = _peft_finish(
                        base_ckpt, tuned_ckpt, spool, peft_state, settings, base_path, base_name, report
                    )
                    report.adapter_bytes = spool.nbytes
                    report.tensors_written = len(spool)
                    report.files = write_adapter_files(out.tmp, spool.arrays(), config)
                else:
                    report.adapter_bytes = spool.nbytes
                    report.tensors_written = len(spool)
                    if pickle:
                        spool.finish_pickle(out.tmp)
                    else:
                        write_safetensors(out.tmp, spool.arrays())
                    report.files = [output_path.name]
            finally:
                spool.close()
            report.finish_errors()
            _check_not_empty(report, is_dir)
            report.warnings += _unmatched_patterns(keep_full, report.tensors)
            if serving is not None:
                report.serving = _serving_verdict(out.tmp, output_path, settings.base_config, max_lora_rank)
            report.seconds = time.perf_counter() - started
            if is_dir:
                (out.tmp / "lorafuse_extract.json").write_text(json.dumps(_provenance(report), indent=2) + "\n")
                report.files.append("lorafuse_extract.json")
            out.commit()
    finally:
        base_ckpt.close()
        if tuned_ckpt is not None:
            tuned_ckpt.close()
    report.seconds = time.perf_counter() - started
    return report


def _min_params(fmt: str, min_params: int | None) -> int:
    """The size below which a tensor is stored whole: the seed layout's 1,000,000 for diffusion/kohya; none in PEFT."""
    if fmt != "peft":
        return 1_000_000 if min_params is None else min_params
    if min_params:
        raise LorafuseError(
            f"--min-params {min_params} applies to --format diffusion/kohya only: a PEFT adapter factorises every "
            "changed 2-D weight at --rank (PEFT loads no adapter without LoRA modules); --keep-full NAME stores a "
            "module whole"
        )
    return 0


def _check_serving(
    serving: str, fmt: str, rank: int, max_lora_rank: int, keep_full: tuple[str, ...], diff_only: bool
) -> None:
    if serving != "vllm":
        raise LorafuseError(f"--serving {serving!r}: lorafuse knows the rules of vllm only")
    check_max_lora_rank(max_lora_rank)
    if fmt != "peft":
        raise LorafuseError(f"--serving vllm writes a PEFT adapter (vLLM loads no other): drop --format {fmt}")
    if rank > max_lora_rank:
        raise LorafuseError(
            f"--rank {rank} is above --max-lora-rank {max_lora_rank} (vLLM's max_lora_rank): pass a lower --rank, "
            "or the --max-lora-rank the server runs with"
        )
    if keep_full or diff_only:
        flag = "--keep-full" if keep_full else "--diff-only"
        raise LorafuseError(f"{flag} stores modules_to_save, which vLLM {VLLM_VERSION} refuses: drop {flag}")


def _serving_architecture(base_config: dict[str, Any] | None, base_path: Path) -> VllmArchitecture:
    """The base's vLLM LoRA modules; an architecture lorafuse holds no rules for is refused (never guessed)."""
    name, arch = vllm_architecture((base_config or {}).get("architectures"))
    if arch is None:
        raise LorafuseError(
            f"{base_path}: {architecture_refusal(name)}: extract without --serving and check the adapter against "
            "the model's file in vLLM"
        )
    return arch


def _serving_verdict(
    folder: Path, output: Path, base_config: dict[str, Any] | None, max_lora_rank: int
) -> dict[str, Any]:
    """vLLM's check of the adapter written (before it is committed): a failing rule is lorafuse's own bug."""
    verdict = check_vllm_path(folder, base_config, max_lora_rank)
    if verdict.servable is not True:
        failed = next(f for f in verdict.findings if f.ok is not True)
        raise AdapterError(
            f"{output}: the vLLM {VLLM_VERSION} check of the adapter failed: {failed.rule}: {failed.detail}"
        )
    return verdict.to_dict()


def _tied_embedding(base_config: dict[str, Any] | None, keys: list[str]) -> bool:
    """True when the output head is the input embedding (config.json ``tie_word_embeddings``, transformers'
    default True; without a config: no ``lm_head.weight`` stored)."""
    if base_config is not None:
        return bool(base_config.get("tie_word_embeddings", True))
    return OUTPUT_EMBEDDING not in keys


def _check_not_empty(report: ExtractReport, is_dir: bool) -> None:
    """An adapter with no tensor: a warning when nothing changed; an error when changes were all left out (PEFT
    refuses to load an adapter without LoRA modules)."""
    if report.tensors_written:
        return
    left = [t.name for t in report.tensors if t.kind == "left_out"]
    if left and is_dir:
        raise AdapterError(
            f"every change was left out ({len(left)} tensors, e.g. {left[0]}), so the adapter would be empty: "
            "--keep-full NAME stores them whole, or use --format diffusion"
        )
    report.warnings.append("the tuned model does not differ from the base: the adapter is empty")


def _keeps_full(name: str, patterns: tuple[str, ...]) -> bool:
    module = name.rpartition(".")[0]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p) for p in patterns)


def _unmatched_patterns(patterns: tuple[str, ...], results: list[TensorResult]) -> list[str]:
    changed = [t.name for t in results if t.delta_norm > 0]
    return [
        f"--keep-full {p!r} matched no changed tensor"
        for p in patterns
        if not any(_keeps_full(n, (p,)) for n in changed)
    ]


@dataclass
class _Settings:
    rank: int
    energy: float | None
    exact_svd: bool
    device: str
    min_params: int
    diff_only: bool
    out_dtype: np.dtype | None
    oversample: int
    power_iters: int | str
    seed: int
    base_config: dict[str, Any] | None = None  # the base's config.json: which layers are GPT-2 Conv1D
    keep_full: tuple[str, ...] = ()  # fnmatch patterns of tensors or modules stored whole
    tied_embedding: bool = False  # the output head is the input embedding
    serving: VllmArchitecture | None = None  # serving="vllm": what vLLM puts LoRAs on in the base's architecture


def _provenance(report: ExtractReport) -> dict[str, Any]:
    """The report, with unchanged tensors left out of the per-tensor list."""
    data = report.to_dict()
    data["tensors"] = [t for t in data["tensors"] if t["kind"] != "similar"]
    return data


def _stream(
    base: Checkpoint,
    tuned: Checkpoint,
    spool: SpoolWriter,
    layout: StoredNames,
    settings: _Settings,
    report: ExtractReport,
    show_progress: bool | None,
) -> _PeftState:
    state = _PeftState()
    keys = base.keys()
    embedding = _embedding_key(keys)
    shared = [name for name in keys if name in tuned]
    total = sum(tuned.infos[name].nbytes for name in shared)
    with _Workspace() as workspace, ByteBar(total, "extracting", show_progress) as bar:
        for name in _counted(shared, tuned, bar):
            binfo, tinfo = base.infos[name], tuned.infos[name]
            if binfo.shape != tinfo.shape:
                note = f"shape {binfo.shape} vs tuned {tinfo.shape}"
                report.count(TensorResult(name, "skipped", binfo.shape, note=note))
                report.warnings.append(f"{name}: shape {binfo.shape} in the base but {tinfo.shape} in the tuned model")
                continue
            same, pair = _compare_and_read(base, tuned, name, workspace)
            if same:
                report.count(TensorResult(name, "similar", binfo.shape))
                continue
            bdtype, tdtype = dtype_of(binfo.code), dtype_of(tinfo.code)
            if not (is_float(bdtype) and is_float(tdtype)):
                kind = short_name(bdtype if not is_float(bdtype) else tdtype)
                note = f"{kind} values cannot be differenced"
                report.count(TensorResult(name, "skipped", binfo.shape, note=note))
                report.warnings.append(f"{name}: non-float tensor ({kind}) changed; it cannot be extracted")
                continue
            if _is_tied_head(name, embedding, base, tuned):
                report.count(TensorResult(name, "tied", binfo.shape, note=f"tied to {embedding}"))
                continue
            result = _extract_one(name, binfo, tinfo, base, tuned, spool, layout, settings, state, workspace, pair)
            report.count(result)
    return state


def _counted(names: list[str], tuned: Checkpoint, bar: ByteBar) -> Iterator[str]:
    """``names`` one by one; the bar advances by a tensor's bytes in the tuned model once its turn is over."""
    for name in names:
        yield name
        bar.update(tuned.infos[name].nbytes)


def overall_error(results: list[TensorResult]) -> float:
    """sqrt(sum ||delta - stored||^2 / sum ||delta||^2) over every extracted tensor."""
    total = sum(t.delta_norm**2 for t in results)
    err = sum((t.rel_error * t.delta_norm) ** 2 for t in results)
    return math.sqrt(err / total) if total > 0 else 0.0


def _is_tied_head(name: str, embedding: str | None, base: Checkpoint, tuned: Checkpoint) -> bool:
    """An lm_head saved beside the embedding it is tied to, equal to it in both models: stored once."""
    if name != OUTPUT_EMBEDDING or embedding is None or embedding not in tuned:
        return False
    if base.infos[embedding].shape != base.infos[name].shape:
        return False
    return _same_values(base, base, embedding, name) and _same_values(tuned, tuned, embedding, name)


def _extract_one(
    name: str,
    binfo: TensorInfo,
    tinfo: TensorInfo,
    base: Checkpoint,
    tuned: Checkpoint,
    spool: SpoolWriter,
    layout: StoredNames,
    settings: _Settings,
    state: _PeftState,
    workspace: _Workspace,
    pair: tuple[np.ndarray, np.ndarray] | None = None,
) -> TensorResult:
    """Store ``tuned - base`` for one tensor; ``pair``: the (tuned, base) values when already read."""
    tuned_value, base_value = pair or (workspace.read(tuned, tinfo, "tuned"), workspace.read(base, binfo, "base"))
    delta, sq_norm = workspace.difference(tuned_value, base_value)
    norm = math.sqrt(sq_norm)
    if not math.isfinite(norm):  # before any SVD or rounding: never a NaN adapter with "error 0.000e+00"
        _refuse_nonfinite(name, tuned_value, base_value, tuned, base, delta)
    shape = tuple(binfo.shape)
    module, attr = _module_of(name)
    peft = layout.fmt == "peft"
    kept = settings.diff_only or _keeps_full(name, settings.keep_full)
    if peft and not kept:
        reason = _left_out_reason(name, module, attr, delta.ndim, settings)
        if reason == "bias":  # lora_B.bias or left out: decided at the end, once every LoRA layer is known
            reason, state.biases[name] = None, settings.out_dtype or F32
        if reason is not None:
            return TensorResult(name, "left_out", shape, rel_error=1.0, delta_norm=norm, note=reason)
    if kept or (not peft and (delta.ndim < 2 or delta.size < settings.min_params)) or name in state.biases:
        stored_dtype = settings.out_dtype or F32
        if peft:
            if name not in state.biases:
                state.diffs[name] = stored_dtype  # written at the end, as modules_to_save
            err_sq = _rounding_error_sq(delta, stored_dtype, workspace)
        else:
            key = layout.diff_name(name)
            if key is None:
                # As the old extractor: only .weight/.bias/.modulation have a difference name.
                return TensorResult(name, "skipped", shape, note="no difference name for this tensor in this format")
            rounded = round_to(delta, stored_dtype)
            spool.add(key, rounded)
            err_sq = _rounding_error_sq(delta, stored_dtype, workspace, rounded)
        err = math.sqrt(err_sq) / norm if norm else 0.0
        return TensorResult(name, "diff", shape, rel_error=err, delta_norm=norm)
    if attr != "weight" or not module:
        return TensorResult(name, "failed", shape, delta_norm=norm, note="only .weight tensors are factorised")
    embedding = peft and name.endswith(EMBEDDING_SUFFIXES) and delta.ndim == 2
    # PEFT's lora_B @ lora_A is the transpose of a Conv1D weight (in, out) and of an embedding (num, dim).
    transposed = embedding or (
        layout.fmt == "peft" and delta.ndim == 2 and bool(is_conv1d_weight(settings.base_config, name))
    )
    rows = delta.reshape(delta.shape[0], -1)
    factors = low_rank(
        rows.T if transposed else rows,
        settings.rank,
        exact=settings.exact_svd,
        energy=settings.energy,
        oversample=settings.oversample,
        power_iters=settings.power_iters,
        seed=_tensor_seed(name, settings.seed),
        sq_norm=sq_norm,
        device=settings.device,
        threads=workspace.threads,
    )
    stored_dtype = settings.out_dtype or dtype_of(tinfo.code)
    up, down = round_to(factors.up, stored_dtype), round_to(factors.down, stored_dtype)
    # The error of the factors as stored: rows ~= up @ down, or (up @ down)^T = down^T @ up^T.
    left, right = _f32(up), _f32(down)
    if transposed:
        left, right = right.T, left.T
    err = math.sqrt(_residual_sq(rows, left, right, workspace)) / norm if norm else 0.0
    k = up.shape[1]
    if delta.ndim > 2:  # Conv: down (k, in, *kernel), up (out, k, 1, ...)
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(*up.shape, *([1] * (delta.ndim - 2)))
    up_name, down_name, alpha_name = layout.lora_names(module)
    if embedding:
        up_name = f"{PEFT_PREFIX}{module}.lora_embedding_B"
        down_name = f"{PEFT_PREFIX}{module}.lora_embedding_A"
        state.embeddings.add(module)
    spool.add(down_name, down)
    spool.add(up_name, up)
    if alpha_name is not None:
        spool.add(alpha_name, np.array(float(k), dtype=F32))
    state.ranks[module] = k
    if transposed and not embedding:
        state.conv1d.add(module)
    return TensorResult(name, "lora", shape, rank=k, rel_error=err, delta_norm=norm, passes=factors.passes)


def _left_out_reason(name: str, module: str, attr: str, ndim: int, settings: _Settings) -> str | None:
    """Why a changed tensor stays out of a PEFT adapter (None: it is factorised), or ``"bias"`` for a changed
    bias, which becomes lora_B.bias where PEFT can merge it (never for vLLM, which refuses lora_bias)."""
    keep = "--keep-full NAME stores it whole (modules_to_save)"
    if settings.serving is not None:
        keep = f"vLLM {VLLM_VERSION} refuses modules_to_save: merge instead to keep it"
    if ndim < 2 or attr != "weight" or not module:
        if attr == "bias" and ndim == 1 and module:
            if settings.serving is None:
                return "bias"
            return f"bias: vLLM {VLLM_VERSION} refuses lora_bias and modules_to_save: merge instead to keep it"
        what = "1-D" if ndim < 2 else f"not a .weight ({attr})"
        return f"{what}: a LoRA cannot hold it; {keep}"
    if name.endswith(EMBEDDING_SUFFIXES) and settings.tied_embedding:
        return (
            "tied to the output head: a PEFT (and vLLM) embedding LoRA changes the input side only; "
            "merge instead, or use --format diffusion"
        )
    if settings.serving is not None and module.rpartition(".")[2] not in settings.serving.adapter_modules():
        return f"vLLM {VLLM_VERSION} has no LoRA for {module.rpartition('.')[2]} in this architecture; merge instead"
    return None


def _rounding_error_sq(
    delta: np.ndarray, dtype: np.dtype, workspace: _Workspace, rounded: np.ndarray | None = None
) -> float:
    """``||delta - delta rounded to dtype||^2``, slice by slice (``rounded``: that rounding, where already made)."""
    if np.dtype(dtype) == F32:
        return 0.0
    flat = delta.reshape(-1)
    done = None if rounded is None else rounded.reshape(-1)
    step = max(1, min(DIFF_SLICE, flat.size))
    scratch = workspace.scratch(1, step)[0]
    total = 0.0
    for start in range(0, flat.size, step):
        part = flat[start : start + step]
        stored = round_to(part, dtype) if done is None else done[start : start + step]
        back = decode_f32(stored, dtype, out=scratch[: part.size])
        total += squared_norm(np.subtract(part, back, out=back))
    return total


def _residual_sq(rows: np.ndarray, left: np.ndarray, right: np.ndarray, workspace: _Workspace) -> float:
    """``||rows - left @ right||^2``, computed block of rows by block of rows (no second copy of the matrix)."""
    m, n = rows.shape
    step = max(1, DIFF_SLICE // max(1, n))
    spans = workspace.threads.spans(m, step)
    buffers = workspace.scratch(len(spans), min(step, m) * n)

    def span(index: int, start: int, stop: int) -> float:
        total = 0.0
        for low in range(start, stop, step):
            high = min(low + step, stop)
            out = buffers[index][: (high - low) * n].reshape(high - low, n)
            np.matmul(left[low:high], right, out=out)
            total += squared_norm(np.subtract(rows[low:high], out, out=out))
        return total

    return workspace.threads.run(spans, span)


def _require_finite(value: np.ndarray, ckpt: Checkpoint, name: str, which: str) -> None:
    if is_float(value.dtype) and not bool(np.isfinite(value).all()):
        raise NonFiniteError(
            f"{ckpt.infos[name].path}: tensor {name!r} of the {which} model holds NaN or Inf, so the adapter "
            "cannot hold it: fix or re-export that model"
        )


def _refuse_nonfinite(
    name: str,
    tuned_value: np.ndarray,
    base_value: np.ndarray,
    tuned: Checkpoint,
    base: Checkpoint,
    delta: np.ndarray,
) -> None:
    """NaN/Inf in either model (or a difference beyond fp32): one line naming the tensor and the model."""
    _require_finite(tuned_value, tuned, name, "tuned")
    _require_finite(base_value, base, name, "base")
    if not bool(np.isfinite(delta).all()):
        raise NonFiniteError(f"the difference of tensor {name!r} overflows fp32: the two models do not belong together")


def _as_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A stored float tensor in ``dtype`` (rounded once from fp32); other tensors keep their own dtype."""
    if values.dtype == dtype or not (is_float(values.dtype) and is_float(dtype)):
        return values
    return round_to(_f32(values), dtype)


def _peft_finish(
    base: Checkpoint,
    tuned: Checkpoint,
    spool: SpoolWriter,
    state: _PeftState,
    settings: _Settings,
    base_path: Path,
    base_name: str | None,
    report: ExtractReport,
) -> dict[str, Any]:
    """Write what the PEFT adapter carries beside its LoRAs, and build adapter_config.json.

    A module with a tensor stored whole (``--keep-full``, ``--diff-only``) is a ``modules_to_save`` entry, which
    stores every parameter of that module (tuned values), its LoRA dropped. A changed bias of a LoRA module becomes
    ``lora_B.bias`` (PEFT ``lora_bias``) when every LoRA layer has a bias (PEFT cannot merge it otherwise); other
    changed biases are left out and reported.
    """
    keys = base.keys()
    whole = _whole_modules(keys, state, spool, settings, tuned, report)
    lora_layers = [m for m in state.ranks if m not in state.embeddings]
    biased = [m for m in lora_layers if f"{m}.bias" in state.biases]
    without = next((m for m in lora_layers if f"{m}.bias" not in base), None)
    lora_bias = bool(biased) and without is None
    for name in state.biases:
        module = _module_of(name)[0]
        if module in whole:
            report.reclassify(name, "diff", "modules_to_save")
        elif not (lora_bias and module in state.ranks):
            why = "its weight did not change, so the module has no LoRA to carry it"
            if module in state.ranks:
                why = f"PEFT's lora_bias needs a bias on every LoRA layer ({without} has none)"
            report.reclassify(name, "left_out", f"bias: {why}; --keep-full NAME stores it whole", 1.0)
    for module in whole:
        for key in (k for k in keys if k.rpartition(".")[0] == module):
            value = tuned.array(key)
            _require_finite(value, tuned, key, "tuned")  # stored whole (modules_to_save), changed or not
            dtype = state.diffs.get(key) or settings.out_dtype or value.dtype
            spool.add(f"{PEFT_PREFIX}{key}", _as_dtype(value, dtype))
    if lora_bias:
        for module in lora_layers:
            bias = f"{module}.bias"
            if bias in state.biases:
                with np.errstate(over="ignore"):  # checked finite when it was extracted
                    delta = _f32(tuned.array(bias)) - _f32(base.array(bias))
                spool.add(f"{PEFT_PREFIX}{module}.lora_B.bias", round_to(delta, state.biases[bias]))
            else:  # zeros keep PEFT from reporting missing keys
                spool.add(f"{PEFT_PREFIX}{module}.lora_B.bias", np.zeros(base.infos[bias].shape, dtype=F32))
    return _peft_config(keys, state, settings, base_path, base_name, sorted(whole), lora_bias)


def _whole_modules(
    keys: list[str],
    state: _PeftState,
    spool: SpoolWriter,
    settings: _Settings,
    tuned: Checkpoint,
    report: ExtractReport,
) -> list[str]:
    """The modules stored whole (``modules_to_save``): those of the tensors kept full; a LoRA of such a module is
    dropped (its weight is stored whole with it)."""
    whole: list[str] = []
    for name in list(state.diffs):
        module = _module_of(name)[0]
        if module in whole:
            continue
        children = [k for k in keys if k.startswith(module + ".")]
        if not module or any("." in k[len(module) + 1 :] for k in children):
            raise AdapterError(
                f"{name} changed but its module holds sub-modules, so PEFT's modules_to_save would copy all of "
                "them: use --format diffusion (or --format kohya) for this model"
            )
        whole.append(module)
        if module in state.ranks:
            names = get_format("peft").names.lora_names(module)[:2]
            if module in state.embeddings:
                names = (f"{PEFT_PREFIX}{module}.lora_embedding_B", f"{PEFT_PREFIX}{module}.lora_embedding_A")
            for key in names:
                spool.discard(key)
            del state.ranks[module]
            state.embeddings.discard(module)
            state.conv1d.discard(module)
            weight = f"{module}.weight"
            state.diffs[weight] = settings.out_dtype or dtype_of(tuned.infos[weight].code)
            report.reclassify(weight, "diff", "modules_to_save")
    return whole


def _peft_config(
    keys: list[str],
    state: _PeftState,
    settings: _Settings,
    base_path: Path,
    base_name: str | None,
    modules_to_save: list[str],
    lora_bias: bool,
) -> dict[str, Any]:
    ranks = state.ranks
    linear = sorted(m for m in ranks if m not in state.conv1d and m not in state.embeddings)
    if state.conv1d and linear:
        # fan_in_fan_out is one flag for the whole adapter: mergers that follow it read every LoRA as Conv1D.
        raise AdapterError(
            f"{linear[0]} (a Linear layer) and {sorted(state.conv1d)[0]} (a GPT-2 Conv1D layer) both changed; one "
            "PEFT adapter cannot hold LoRAs of both: use --format diffusion (or --format kohya) for this model"
        )
    r = max(ranks.values(), key=list(ranks.values()).count) if ranks else settings.rank  # the most common rank
    pattern = {m: k for m, k in ranks.items() if k != r}
    base_config = settings.base_config
    architectures = (base_config or {}).get("architectures") or []
    task_type = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name or (base_config or {}).get("_name_or_path") or str(base_path),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha = rank everywhere: every module's scale is 1
        "target_modules": _target_modules(keys, ranks),
        "modules_to_save": modules_to_save or None,
        "lora_bias": lora_bias,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": bool(state.conv1d),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _target_modules(keys: list[str], ranks: dict[str, int]) -> list[str]:
    """Short names (``q_proj``) when every base module of that name has a LoRA, else full module names."""
    if not ranks:
        return []
    leaves = {m.rpartition(".")[2] for m in ranks}
    weights = {k[: -len(".weight")] for k in keys if k.endswith(".weight")}
    all_covered = all(m in ranks for m in weights if m.rpartition(".")[2] in leaves)
    return sorted(leaves) if all_covered else sorted(ranks)
