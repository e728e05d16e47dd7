"""Memoryviews of CPU tensors' bytes for ``os.preadv``/``os.write``, without numpy (not a dependency of lorafuse:
``Tensor.numpy()`` fails where numpy is not installed)."""

from __future__ import annotations

import ctypes

import torch


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable, flat ``B`` memoryview over the bytes of ``tensor`` (contiguous, on the CPU), without a copy.

    The view keeps the tensor alive: it holds a ctypes array over the tensor's memory, which holds the tensor.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    array._tensor = tensor  # type: ignore[attr-defined]  # lifetime: the array (and so the view) owns the tensor
    return memoryview(array).cast("B")
