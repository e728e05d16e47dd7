"""The torch kernel (``--device cuda``): the same plan and the same edits as the numpy kernel, on a GPU.

Each touched tensor goes to the device whole, in its stored dtype (half the bytes over the bus for bf16/fp16),
becomes fp32 there, gets its edits through :class:`TorchOps` (the operations edits.py's math needs, on torch
tensors: every edit keeps one implementation), is checked and rounded to the output dtype on the device, and
comes back as bytes for the writer. A rank-16 product is not work a GPU saves much on: this is for machines with
few cores and DoRA-heavy adapters (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..arrays import F32, check_values, decode_f32
from ..edits import BlockOps
from ..io.writer import array_bytes
from ..plan import MergePlan, OutputTensor
from ..torch_bridge import require_torch, to_numpy, to_torch, torch_dtype
from .kernel import Emit, apply_edits, matrix_shape, reads_base, require_same_shape


class TorchOps(BlockOps):
    """:class:`~lorafuse.edits.BlockOps` on torch tensors on ``device`` (also the runtime's, on a live model)."""

    def __init__(self, device: Any = "cpu") -> None:
        super().__init__()
        self.torch = require_torch("--device cuda")
        self.device = device

    def array(self, values: Any) -> Any:
        if isinstance(values, np.ndarray):  # fresh fp32 values read from a file (edits.TensorRef)
            return to_torch(values).to(self.device)
        # a tensor someone holds (the runtime's patches): a copy, as edits change what they load
        return values.to(device=self.device, dtype=self.torch.float32, copy=True)

    def product(self, left: Any, right: Any) -> Any:
        return left @ right

    def norm(self, values: Any, axis: int) -> Any:
        return self.torch.linalg.vector_norm(values, dim=axis, keepdim=True)

    def contiguous(self, values: Any) -> Any:
        return values.contiguous()

    def svd(self, values: Any) -> tuple[Any, Any, Any]:
        return self.torch.linalg.svd(values, full_matrices=False)


class CudaMerger:
    """Merges whole tensors on ``device`` (one per thread; two threads: one reads while the other computes)."""

    def __init__(self, plan: MergePlan, device: str):
        self.plan = plan
        self.ops = TorchOps(device)
        self.torch = self.ops.torch

    def merge(self, out: OutputTensor, emit: Emit, stopped: Callable[[], bool] = lambda: False) -> None:
        """Compute ``out`` on the device and hand its output bytes to ``emit`` at once."""
        try:
            emit(0, array_bytes(self._merge(out)))
        finally:
            self.ops.forget()

    def _merge(self, out: OutputTensor) -> np.ndarray:
        torch, base = self.torch, self.plan.base
        info = base.infos[out.source]
        rows, cols = matrix_shape(out.shape)
        with torch.no_grad():
            read = reads_base(out)
            if read:
                require_same_shape(out, info.shape)
            if not read:
                block = torch.empty(rows, cols, dtype=torch.float32, device=self.ops.device)
            elif out.dequant is not None:  # quantized base: dequantized on the host (quantized.py), then moved
                values = decode_f32(base.array(out.source), info.dtype).reshape(rows, cols)
                out.dequant.apply(base, values, 0, rows, tuple(info.shape))
                block = self.ops.array(values.astype(F32, copy=False))
            else:  # moved in its own dtype, converted where the math runs
                block = to_torch(base.array(out.source)).to(self.ops.device).float().reshape(rows, cols)
            if block.numel():
                apply_edits(out, block, 0, self.ops, lambda b: b.clone())
                low, high = (float(v) for v in torch.aminmax(block))
                check_values(out.name, np.array([low, high], dtype=np.float32), out.dtype)
            result = block.to(torch_dtype(out.dtype)).cpu()
        return to_numpy(result).reshape(out.shape)
