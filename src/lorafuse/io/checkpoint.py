"""A checkpoint: every tensor of a model or adapter across its files, read lazily by name.

Safetensors files are read header-first and tensor by tensor with pread. Pickled ``.bin/.pt/.pth`` files are
opened with ``torch.load(weights_only=True, mmap=True)`` so no code from the checkpoint ever runs.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS
from ..errors import InputError
from ..torch_bridge import to_numpy
from .model_files import find_model_weights
from .safetensors_file import TensorInfo, is_lfs_pointer, lfs_pointer_error, read_array, read_header, read_tensor

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NESTED_STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state_dict")


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled checkpoint safely (weights only), unwrapping nested ``state_dict``/``model`` dicts."""
    if is_lfs_pointer(path):
        raise lfs_pointer_error(path)
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


def _code(tensor: torch.Tensor) -> str:
    """The safetensors dtype code of a torch tensor's dtype."""
    return TORCH_TO_SAFETENSORS[tensor.dtype]


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
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
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
                infos = {
                    k: TensorInfo(k, path, v.dtype, tuple(v.shape), -1, v.numel() * v.element_size(), _code(v))
                    for k, v in state.items()
                }
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

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, in memory owned by the caller."""
        info = self.infos[name]
        if info.path in self._pickled:
            return self._pickled[info.path][name].clone()
        return read_tensor(info, self.fd(info.path))

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array in its stored dtype, in memory owned by the caller."""
        info = self.infos[name]
        if info.path in self._pickled:
            return to_numpy(self._pickled[info.path][name]).copy()
        return read_array(info, self.fd(info.path))

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.infos:
            yield name, self.get(name)

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
    read one at a time (``safe_open(...).get_tensor``); ``infos`` carry offset -1 (no byte ranges of our own).
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
                    handle = safe_open(str(path), framework="pt")
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
        if code not in SAFETENSORS_TO_TORCH:
            raise InputError(f"{path}: tensor {name!r} has dtype {code}, which lorafuse cannot read")
        if name in self.infos:
            raise InputError(f"tensor {name!r} appears in both {self.infos[name].path} and {path}")
        dtype = SAFETENSORS_TO_TORCH[code]
        numel = 1
        for d in shape:
            numel *= d
        self.infos[name] = TensorInfo(name, path, dtype, shape, -1, numel * dtype.itemsize, code)

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        try:
            tensor = self._handles[info.path].get_tensor(name)
        except Exception as exc:  # the library refuses to read it after all
            raise _library_error(info.path, exc) from exc
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise InputError(f"{info.path}: the safetensors library reads tensor {name!r} unlike its header")
        return tensor

    def array(self, name: str) -> np.ndarray:
        return to_numpy(self.get(name))

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
    if path.is_file():
        stem = path.name.rsplit(".", 1)[0]
        return Checkpoint([path]), stem, None
    files, prefix, index = find_model_weights(path)
    return Checkpoint(files), prefix, index
