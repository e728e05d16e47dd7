"""LoRA layers computed on the fly: a wrapper adds each adapter's output to the wrapped layer's output.

The math is PEFT's forward (``peft/tuners/lora/layer.py``, ``dora.py``), re-derived here:

- Linear (and GPT-2 ``Conv1D``, whose weight is stored (in, out)): ``y = base(x) + s * B(A(x))``
- Embedding: ``y = base(x) + s * embed(x, A.T) @ B.T`` (times the layer's ``embed_scale`` when it has one)
- Conv: ``y = base(x) + s * convB(convA(x))``, convA with the base kernel, stride and padding, convB 1x1
- DoRA: with ``k = m / ||W + s B A||`` (per output feature, not differentiated),
  ``y = result + (k - 1) * (result - bias) + k * s * B(A(x))``; embeddings ``y = k * result + k * s * lora``.
  Like PEFT, ``result`` is the running output, so a DoRA adapter after another adapter sees that one's output.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Kind = Literal["linear", "embedding", "conv"]
_CONV_FNS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def layer_kind(module: nn.Module) -> Kind | None:
    """How LoRA attaches to ``module``, or None when it is not a layer type the runtime wraps."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    # transformers' Conv1D (GPT-2): x @ W + b with W stored (in, out); matched by name to avoid the import.
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return "linear"
    return None


def is_conv1d_layer(module: nn.Module) -> bool | None:
    """True for transformers' GPT-2 ``Conv1D``, False for ``nn.Linear``, None for anything else (plan.py decides)."""
    if type(module).__name__ == "Conv1D":
        return True
    return False if isinstance(module, nn.Linear) else None


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter tensors stay fp32 on a half-precision base, as PEFT's ``autocast_adapter_dtype`` does."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def _embed_scale(base: nn.Module) -> torch.Tensor | None:
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


class LoraPatch(nn.Module):
    """One adapter's factors on one layer: ``lora_A`` (r, in[, *kernel]), ``lora_B`` (out, r[, 1...]).

    ``transposed`` says the base weight is stored (in, out) (Conv1D, embeddings); it matters only for the DoRA
    norm and for merging. ``lora_bias`` is PEFT's ``lora_B.bias``; ``magnitude`` makes it DoRA.
    """

    def __init__(
        self,
        kind: Kind,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        *,
        transposed: bool = False,
        bias: torch.Tensor | None = None,
        magnitude: torch.Tensor | None = None,
        dropout: float = 0.0,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.kind: Kind = kind
        self.scale = float(scale)
        self.transposed = transposed
        self.lora_A = nn.Parameter(A, requires_grad=trainable)
        self.lora_B = nn.Parameter(B, requires_grad=trainable)
        self.lora_bias = None if bias is None else nn.Parameter(bias, requires_grad=trainable)
        self.magnitude = None if magnitude is None else nn.Parameter(magnitude.reshape(-1), requires_grad=trainable)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def extra_repr(self) -> str:
        dora = ", dora" if self.magnitude is not None else ""
        return f"kind={self.kind}, rank={self.rank}, scale={self.scale:g}{dora}"

    def lora_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """B @ A as an (out, in[*kernel]) matrix (unscaled)."""
        a, b = self.lora_A, self.lora_B
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output feature (detached, as DoRA treats it as a constant)."""
        w = weight.detach().to(self.lora_A.dtype)
        w = w.T if self.transposed else w.reshape(w.shape[0], -1)
        lora = self.lora_weight().detach()
        return torch.linalg.vector_norm(w + self.scale * lora, dim=1)

    def _dora_factor(self, base: nn.Module) -> torch.Tensor:
        assert self.magnitude is not None
        return self.magnitude / self.weight_norm(base.weight)

    def forward(self, x: torch.Tensor, result: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``result`` (the output so far) plus this adapter's contribution."""
        if self.kind == "embedding":
            return self._forward_embedding(x, result, base)
        x = x.to(self.lora_A.dtype)
        h = self.dropout(x)
        if self.kind == "conv":
            conv = _CONV_FNS[self.lora_A.dim()]
            lora = conv(
                conv(h, self.lora_A, stride=base.stride, padding=base.padding),
                self.lora_B,
                self.lora_bias,
                groups=base.groups,
            )
            view = (1, -1) + (1,) * (result.dim() - 2)
        else:
            lora = F.linear(F.linear(h, self.lora_A), self.lora_B, self.lora_bias)
            view = (-1,)
        if self.magnitude is None:
            return result + lora * self.scale
        factor = self._dora_factor(base).view(view)
        if self.training and not isinstance(self.dropout, nn.Identity):
            # With dropout the base output must be recomputed from the dropped-out input, as PEFT does.
            weight = base.weight.to(x.dtype)
            if self.kind == "conv":
                base_out = conv(h, weight, None, base.stride, base.padding, base.dilation, base.groups)
            else:
                base_out = F.linear(h, weight.T if self.transposed else weight)
        else:
            bias = getattr(base, "bias", None)
            base_out = result if bias is None else result - bias.view(view)
        return result + ((factor - 1) * base_out + factor * lora * self.scale)

    def _forward_embedding(self, x: torch.Tensor, result: torch.Tensor, base: nn.Module) -> torch.Tensor:
        after_a = F.embedding(
            x,
            self.lora_A.T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        embed_scale = _embed_scale(base)
        if self.magnitude is None:
            out = (after_a @ self.lora_B.T) * self.scale
            if embed_scale is not None:
                out = out * embed_scale.to(out.dtype)
            return result + out
        factor = self._dora_factor(base)
        out = factor * (after_a @ self.lora_B.T) * self.scale
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        return factor * result + out


class LoraModule(nn.Module):
    """A layer with LoRA adapters on top: ``base_layer`` keeps the original module, ``lora`` one patch per adapter.

    Attributes the wrapper lacks (``weight``, ``in_features``, ``padding_idx`` ...) are read from the base layer, so
    code that inspects the layer keeps working.
    """

    def __init__(self, base_layer: nn.Module, kind: Kind) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind: Kind = kind
        self.lora = nn.ModuleDict()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "lora"):
                raise
            return getattr(self._modules["base_layer"], name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not len(self.lora):
            return result
        dtype = result.dtype
        for patch in self.lora.values():
            result = patch(x, result, self.base_layer)
        return result.to(dtype)
