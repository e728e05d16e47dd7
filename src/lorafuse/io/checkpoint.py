"""A checkpoint: every tensor of a model or adapter across its files, read lazily by name, as numpy arrays.

Safetensors files are read header-first and tensor by tensor with pread (no torch). Pickled ``.bin/.pt/.pth``
files need the torch extra: they are opened with ``torch.load(weights_only=True, mmap=True)`` so no code from
the checkpoint ever runs.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import code_of, dtype_of, nbytes_of
from ..errors import InputError
from ..torch_bridge import numpy_dtype, require_torch, to_numpy
from .model_files import find_model_weights
from .safetensors_file import TensorInfo, is_lfs_pointer, lfs_pointer_error, read_array, read_elements, read_header

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NESTED_STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state_dict")
# numpy cannot hold these through the safetensors library's numpy loader (its names are not numpy's).
LIBRARY_TORCH_ONLY = ("F8_E4M3", "F8_E5M2")


def load_pickled_state_dict(path: Path) -> dict[str, Any]:
    """Load a pickled checkpoint safely (weights only), unwrapping nested ``state_dict``/``model`` dicts.

    Returns torch tensors by name; needs the torch extra (a one-line error without it).
    """
    if is_lfs_pointer(path):
        raise lfs_pointer_error(path)
    torch = require_torch(f"reading {path.name} (a pickled PyTorch checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise InputError(
            f"cannot load {path} as a weights-only PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}): re-export it as safetensors"
        ) from exc
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in NESTED_STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise InputError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{path} holds no tensors")
    return tensors


def _pickled_info(name: str, path: Path, tensor: Any) -> TensorInfo:
    code = code_of(numpy_dtype(tensor.dtype))
    shape = tuple(tensor.shape)
    return TensorInfo(name, path, code, shape, -1, nbytes_of(dtype_of(code), shape))


class Checkpoint:
    """Lazy, read-only access to the tensors of one or more weight files.

    ``infos`` maps every tensor name to its :class:`TensorInfo` (for pickled files ``offset`` is -1 and the
    tensor comes from the memory-mapped state dict).
    """

    def __init__(self, files: list[Path]):
        if not files:
            raise InputError("no weight files given")
        self.files = [Path(f) for f in files]
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._pickled: dict[Path, dict[str, Any]] = {}
        self._fds: dict[Path, int] = {}
        for path in self.files:
            if not path.is_file():
                raise InputError(f"weight file {path} does not exist")
            if path.suffix == SAFETENSORS_SUFFIX:
                infos, meta = read_header(path)
                self.metadata.update(meta)
            else:
                state = load_pickled_state_dict(path)
                self._pickled[path] = state
                infos = {k: _pickled_info(k, path, v) for k, v in state.items()}
            for name, info in infos.items():
                if name in self.infos:
                    raise InputError(f"tensor {name!r} appears in both {self.infos[name].path} and {path}")
                self.infos[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def keys(self) -> list[str]:
        return list(self.infos)

    @property
    def is_safetensors(self) -> bool:
        return not self._pickled

    def fd(self, path: Path) -> int:
        """An open read-only descriptor for ``path`` (kept open until :meth:`close`)."""
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array in its stored dtype, in memory owned by the caller."""
        info = self.infos[name]
        if info.path in self._pickled:
            return to_numpy(self._pickled[info.path][name]).copy()
        return read_array(info, self.fd(info.path))

    def elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``start:stop`` of tensor ``name`` flattened, in its stored dtype (one pread for safetensors;
        ``out``: a uint8 buffer to read into, reused by the caller)."""
        info = self.infos[name]
        if info.path in self._pickled:
            return to_numpy(self._pickled[info.path][name].reshape(-1)[start:stop])
        return read_elements(info, self.fd(info.path), start, stop, out)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LibraryCheckpoint(Checkpoint):
    """A :class:`Checkpoint` of safetensors files read through the safetensors library itself, not lorafuse's reader.

    ``lorafuse verify`` reads a merged output this way, so that a header the merge wrote wrongly (and that the
    merge's own reader might accept) is caught by the library that every consumer of the file will use. Tensors are
    read one at a time (``safe_open(...).get_tensor``, numpy); ``infos`` carry offset -1 (no byte ranges of our
    own). fp8 tensors are read through torch (the library's numpy loader has no fp8).
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        if not files:
            raise InputError("no weight files given")
        self.files = [Path(f) for f in files]
        self.infos = {}
        self.metadata = {}
        self._pickled = {}
        self._fds = {}
        self._handles: dict[Path, Any] = {}
        try:
            for path in self.files:
                try:
                    handle = safe_open(str(path), framework="np")
                except Exception as exc:  # SafetensorError, OSError: every refusal of the library
                    raise _library_error(path, exc) from exc
                self._handles[path] = handle
                self.metadata.update(handle.metadata() or {})
                for name in handle.keys():
                    self._add(path, name, handle.get_slice(name))
        except BaseException:
            self.close()
            raise

    def _add(self, path: Path, name: str, view: Any) -> None:
        code, shape = view.get_dtype(), tuple(view.get_shape())
        try:
            dtype = dtype_of(code)
        except Exception:
            raise InputError(f"{path}: tensor {name!r} has dtype {code}, which lorafuse cannot read") from None
        if name in self.infos:
            raise InputError(f"tensor {name!r} appears in both {self.infos[name].path} and {path}")
        self.infos[name] = TensorInfo(name, path, code, shape, -1, nbytes_of(dtype, shape))

    def array(self, name: str) -> np.ndarray:
        info = self.infos[name]
        try:
            if info.code in LIBRARY_TORCH_ONLY:
                from safetensors import safe_open

                require_torch(f"reading the fp8 tensor {name!r} of {info.path}")
                with safe_open(str(info.path), framework="pt") as handle:
                    array = to_numpy(handle.get_tensor(name))
            else:
                array = self._handles[info.path].get_tensor(name)
        except Exception as exc:  # the library refuses to read it after all
            if isinstance(exc, InputError):
                raise
            raise _library_error(info.path, exc) from exc
        if array.dtype != info.dtype or tuple(array.shape) != info.shape:
            raise InputError(f"{info.path}: the safetensors library reads tensor {name!r} unlike its header")
        return array

    def elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        return self.array(name).reshape(-1)[start:stop]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        super().close()


def _library_error(path: Path, exc: BaseException) -> InputError:
    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return InputError(f"the safetensors library cannot read {path} ({reason}): the file is damaged; write it again")


def open_output(path: Path) -> Checkpoint:
    """Open a written model (folder or file) to check it: safetensors through the library itself, pickles safely."""
    path = Path(path)
    files = [path] if path.is_file() else find_model_weights(path)[0]
    if files and all(f.suffix == SAFETENSORS_SUFFIX for f in files):
        return LibraryCheckpoint(files)
    return Checkpoint(files)


def open_model(path: Path) -> tuple[Checkpoint, str, Path | None]:
    """Open a model folder or a single weight file: (checkpoint, weight-file prefix, index file or None)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":  # llama.cpp's format: tensors under transformers names
        from .gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint(path), "model", None
    if path.is_file():
        stem = path.name.rsplit(".", 1)[0]
        return Checkpoint([path]), stem, None
    files, prefix, index = find_model_weights(path)
    return Checkpoint(files), prefix, index
