"""``lorafuse verify``'s output level: the merged model and base + adapters on the fly run the same inputs.

Both models load with transformers in fp32. LoRA adapters are applied by :mod:`lorafuse.runtime` (its own forward;
PEFT for PEFT adapters it cannot apply); an adapter of another PEFT tuner type by PEFT's own layers where peft is
installed (the runtime would apply it with the merge's own edit math, a check of the wiring only, and the report
says so). Needs torch and transformers (verify.py skips the check, with a warning, without them).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from .arrays import F32, is_float
from .engine import compute_tensor
from .errors import LorafuseError
from .io.checkpoint import open_model, open_output
from .io.extra_files import read_json
from .plan import build_plan
from .quantized import find_quantization_config
from .torch_bridge import to_torch
from .verify import DEFAULT_LOGIT_RTOL, DEFAULT_MIN_TOP1, OutputCheck, _close_adapter

log = logging.getLogger("lorafuse")


def _dominant_float_dtype(path: Path) -> np.dtype:
    """The float dtype holding most of a merged model's parameters (sets the output-level tolerance)."""
    checkpoint = open_output(path)
    try:
        counts: dict[Any, int] = {}
        for info in checkpoint.infos.values():
            if is_float(info.dtype):
                counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    finally:
        checkpoint.close()
    return max(counts, key=counts.__getitem__) if counts else F32


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _peft_types(adapters: list[Path]) -> list[str | None]:
    """Each adapter's PEFT tuner type (``LORA``, ``IA3`` ...), None for an adapter that is no PEFT folder."""
    types: list[str | None] = []
    for path in adapters:
        config = read_json(path / "adapter_config.json") if path.is_dir() else None
        types.append(str(config.get("peft_type") or "LORA").upper() if isinstance(config, dict) else None)
    return types


def _apply_adapters(
    load_base: Any, adapters: list[Path], weights: list[float], adapter_format: str | None = None
) -> tuple[Any, str]:
    """The base model with the adapters applied on the fly, and how.

    LoRA adapters: lorafuse.runtime (its own forward, not the merge's math), else PEFT. An adapter of another PEFT
    tuner type: PEFT's own layers where peft is installed, as an independent check (the runtime applies such an
    update with the merge's own edit math, which checks the wiring, not the math), else the runtime, saying so.
    """
    types = _peft_types(adapters)
    others = sorted({t for t in types if t not in (None, "LORA")})
    peft_ok = all(t is not None for t in types) and importlib.util.find_spec("peft") is not None
    if others and peft_ok and all(w == 1.0 for t, w in zip(types, weights) if t != "LORA"):
        try:
            return _apply_with_peft(load_base(), adapters, weights, types), "PEFT"
        except Exception as exc:  # PEFT cannot load it here: the runtime below still checks the wiring
            log.info("PEFT could not apply the adapters (%s); using the runtime", _first_line(exc))
    model = load_base()
    try:
        from .formats import read_adapter
        from .runtime import apply_adapter

        # Read with the live model's names and shapes, which formats such as kohya resolve their names against.
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        for path, weight in zip(adapters, weights):
            adapter = read_adapter(path, label=str(path), fmt=adapter_format, base_shapes=shapes)
            try:
                apply_adapter(model, adapter, weight=weight)
            finally:
                _close_adapter(adapter)
        if others:
            # PEFT missing, or a --weight PEFT has no meaning for: the output level then checks the wiring only
            return model, f"runtime ({', '.join(others)} by the merge's own math, not an independent check)"
        return model, "runtime LoRA"
    except (ImportError, LorafuseError) as exc:
        if not peft_ok or others:
            raise LorafuseError(str(exc)) from exc
        log.info("runtime LoRA could not apply the adapters (%s); using PEFT", exc)
    return _apply_with_peft(load_base(), adapters, weights, types), "PEFT"


def _peft_groups(types: list[str | None]) -> list[list[int]]:
    """Adapter indices in the groups PEFT holds in one model: a run of LoRA adapters, any other adapter alone."""
    groups: list[list[int]] = []
    for i, peft_type in enumerate(types):
        if groups and peft_type == "LORA" and types[groups[-1][-1]] == "LORA":
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _apply_with_peft(model: Any, adapters: list[Path], weights: list[float], types: list[str | None]) -> Any:
    """PEFT's model of the adapters: each group (:func:`_peft_groups`) but the last merged with
    ``merge_and_unload`` before the next is loaded (PEFT holds no two tuner types at once), the last on the fly;
    a LoRA adapter's weight scales its layers' scaling."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    groups = _peft_groups(types)
    for number, group in enumerate(groups):
        names = [f"lorafuse_{i}" for i in group]
        peft_model = PeftModel.from_pretrained(model, adapters[group[0]], adapter_name=names[0])
        for name, i in zip(names[1:], group[1:]):
            peft_model.load_adapter(adapters[i], adapter_name=name)
        for layer in peft_model.modules():
            if isinstance(layer, LoraLayer):
                for name, i in zip(names, group):
                    if name in layer.scaling:
                        layer.scaling[name] *= weights[i]
        peft_model.base_model.set_adapter(names)
        if number == len(groups) - 1:
            return peft_model
        model = peft_model.merge_and_unload(adapter_names=names)
    raise AssertionError("no adapters")


def _dequantized_model(model_cls: Any, merged_path: Path, base_path: Path, base_config: Any) -> Any:
    """The base model, dequantized by lorafuse, in the merged model's (unquantized) architecture."""
    model = model_cls.from_pretrained(merged_path, dtype=torch.float32)
    checkpoint, _, _ = open_model(base_path)
    try:
        plan = build_plan(checkpoint, [], None, base_config, check_values=False)
        state = {t.name: to_torch(compute_tensor(plan, replace(t, dtype=F32))) for t in plan.tensors}
    finally:
        checkpoint.close()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LorafuseError(f"the dequantized base does not fit the merged architecture ({(missing + unexpected)[0]})")
    return model


def _model_inputs(config: Any, merged_path: Path, prompts: Sequence[str] | None) -> dict[str, torch.Tensor]:
    if prompts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
    else:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text_config, "vocab_size", None) or getattr(config, "vocab_size", None)
        if not vocab:
            raise LorafuseError("the config names no vocab_size")
        ids = torch.randint(0, int(vocab), (2, 16), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def _forward(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out[0]).float()


def check_outputs(
    merged_path: Path,
    base_path: Path,
    adapters: list[str | Path],
    weights: list[float],
    prompts: Sequence[str] | None = None,
    logit_rtol: float | None = None,
    min_top1: float = DEFAULT_MIN_TOP1,
    device: str = "cpu",
    adapter_format: str | None = None,
) -> OutputCheck:
    """Run the same inputs through MERGED and through BASE + adapters on the fly, both in fp32."""
    config_dict = read_json(merged_path / "config.json") if merged_path.is_dir() else None
    if not config_dict:
        return OutputCheck(False, "the merged model has no config.json")
    arch = (config_dict.get("architectures") or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        return OutputCheck(False, f"architecture {arch!r} is not one transformers provides")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        return _run_outputs(
            model_cls,
            arch,
            merged_path,
            base_path,
            adapters,
            weights,
            prompts,
            device,
            logit_rtol,
            min_top1,
            adapter_format,
        )
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _resize_vocab(model: Any, vocab: Any) -> None:
    """Give the base the merged model's vocabulary size, as training with added tokens did (the adapter holds the
    resized embedding and head whole, so the new rows' initial values do not matter)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(vocab, int) and embeddings is not None and embeddings.weight.shape[0] != vocab:
        model.resize_token_embeddings(vocab)


def _run_outputs(
    model_cls: Any,
    arch: str,
    merged_path: Path,
    base_path: Path,
    adapters: list[str | Path],
    weights: list[float],
    prompts: Sequence[str] | None,
    device: str,
    logit_rtol: float | None,
    min_top1: float,
    adapter_format: str | None,
) -> OutputCheck:
    loaded: list[Any] = []

    base_config = read_json(base_path / "config.json") if base_path.is_dir() else None
    quantized = find_quantization_config(base_config) is not None

    merged_vocab = (read_json(merged_path / "config.json") or {}).get("vocab_size") if merged_path.is_dir() else None

    def load_base() -> Any:  # the first call hands over the model loaded below, later calls reload it
        if loaded:
            return loaded.pop()
        if quantized:  # transformers may not load it here (fp8 on CPU): rebuild it from our dequantization
            return _dequantized_model(model_cls, merged_path, base_path, base_config).to(device).eval()
        model = model_cls.from_pretrained(base_path, dtype=torch.float32)
        _resize_vocab(model, merged_vocab)
        return model.to(device).eval()

    try:
        merged_model = model_cls.from_pretrained(merged_path, dtype=torch.float32).to(device).eval()
        loaded.append(load_base())
    except Exception as exc:  # any loading failure means the check cannot run, not that the merge is wrong
        return OutputCheck(False, f"{arch} did not load with transformers ({_first_line(exc)})")
    try:
        inputs = {k: v.to(device) for k, v in _model_inputs(merged_model.config, merged_path, prompts).items()}
        expected_model, method = _apply_adapters(load_base, [Path(a) for a in adapters], weights, adapter_format)
        expected = _forward(expected_model.eval(), inputs)
        actual = _forward(merged_model, inputs)
    except LorafuseError as exc:
        return OutputCheck(False, f"the adapters could not be applied on the fly ({exc})")
    except Exception as exc:  # a model that does not run on these inputs: report, do not fail the merge
        return OutputCheck(False, f"running {arch} failed ({_first_line(exc)})")
    mask = (
        inputs["attention_mask"].bool()
        if "decoder_input_ids" not in inputs
        else torch.ones(expected.shape[:-1], dtype=torch.bool)
    )
    diff = (actual - expected).abs()[mask]
    rtol = logit_rtol if logit_rtol is not None else DEFAULT_LOGIT_RTOL.get(_dominant_float_dtype(merged_path), 1e-2)
    peak = float(expected[mask].abs().max())
    agreement = float((actual.argmax(-1) == expected.argmax(-1))[mask].float().mean())
    check = OutputCheck(
        ran=True,
        max_logit_diff=float(diff.max()),
        max_logit=peak,
        logit_tolerance=rtol * peak,
        top1_agreement=agreement,
        min_top1=min_top1,
        tokens=int(mask.sum()),
        method=method,
    )
    check.ok = check.max_logit_diff <= check.logit_tolerance and agreement >= min_top1
    return check
