"""Whether a serving engine loads a PEFT adapter as it is: vLLM's LoRA rules, held as data, and the check.

Every rule below was read from vLLM 0.33.0 (``pip download --no-deps vllm==0.33.0``; the file each rule comes from
is named beside it). vLLM is not imported: these are facts about its loader, so a newer vLLM may differ, and the
version is printed with every verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LorafuseError

VLLM_VERSION = "0.33.0"
# vllm/config/lora.py: MaxLoRARanks, the values --max-lora-rank accepts, and LoRAConfig.max_lora_rank's default.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# vllm/lora/peft_helper.py, PEFTHelper._validate_features: modules_to_save must be None or these (one of them).
VLLM_MODULES_TO_SAVE = ("classifier", "score")
# ... init_lora_weights as a string: only these inits (they leave the base weights alone) are served.
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# ... PEFT config keys that vLLM refuses when set (truthy), with what they are.
VLLM_REFUSED_FEATURES = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias (lora_B.bias)",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QALoRA",
}
# vllm/lora/lora_model.py (from_local_checkpoint): the weight files it reads, in this order.
VLLM_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
# vllm/lora/utils.py, parse_fine_tuned_lora_name: the only tensor names it parses (any other raises).
VLLM_TENSOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
# ... is_base_embedding_weights: base embeddings saved beside the adapter, skipped.
VLLM_SKIPPED_TENSORS = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class VllmArchitecture:
    """What vLLM puts a LoRA on in one model class (its ``packed_modules_mapping`` and ``embedding_modules``).

    vllm/lora/utils.py, get_supported_lora_modules: every linear layer (by its last name) plus the model's
    embedding modules; vllm/lora/worker_manager.py, _load_adapter: a packed layer (``qkv_proj``) stands for the
    checkpoint modules it packs (``q_proj``, ``k_proj``, ``v_proj``), which are the names an adapter may use.
    """

    source: str  # the vLLM model file the facts were read from
    linear: tuple[str, ...]  # vLLM's linear layers in the decoder
    packed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    embeddings: tuple[str, ...] = ()  # embed_tokens / lm_head when the model declares them

    def adapter_modules(self) -> frozenset[str]:
        """The module names (last component) an adapter may hold LoRAs for."""
        names = [n for layer in self.linear for n in self.packed.get(layer, (layer,))]
        return frozenset([*names, *self.embeddings])


_LLAMA_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_EMBEDDINGS = ("embed_tokens", "lm_head")
VLLM_ARCHITECTURES: dict[str, VllmArchitecture] = {
    "LlamaForCausalLM": VllmArchitecture("vllm/model_executor/models/llama.py", _LLAMA_LINEAR, _PACKED, _EMBEDDINGS),
    # MistralForCausalLM(LlamaForCausalLM) sets embedding_modules = {}: no LoRA on the embeddings.
    "MistralForCausalLM": VllmArchitecture("vllm/model_executor/models/mistral.py", _LLAMA_LINEAR, _PACKED),
    # Qwen2ForCausalLM declares no embedding_modules (SupportsLoRA's default is {}).
    "Qwen2ForCausalLM": VllmArchitecture("vllm/model_executor/models/qwen2.py", _LLAMA_LINEAR, _PACKED),
    "Qwen3ForCausalLM": VllmArchitecture("vllm/model_executor/models/qwen3.py", _LLAMA_LINEAR, _PACKED, _EMBEDDINGS),
    # Phi-3 checkpoints store qkv_proj and gate_up_proj fused: they pack themselves.
    "Phi3ForCausalLM": VllmArchitecture(
        "vllm/model_executor/models/phi3.py",
        _LLAMA_LINEAR,
        {"qkv_proj": ("qkv_proj",), "gate_up_proj": ("gate_up_proj",)},
        _EMBEDDINGS,
    ),
    "GemmaForCausalLM": VllmArchitecture("vllm/model_executor/models/gemma.py", _LLAMA_LINEAR, _PACKED),
    "Gemma2ForCausalLM": VllmArchitecture("vllm/model_executor/models/gemma2.py", _LLAMA_LINEAR, _PACKED),
}


def check_max_lora_rank(value: int) -> int:
    """``value`` when vLLM's ``--max-lora-rank`` accepts it, else a one-line error listing what it accepts."""
    if value not in VLLM_MAX_LORA_RANKS:
        choices = ", ".join(map(str, VLLM_MAX_LORA_RANKS))
        raise LorafuseError(f"--max-lora-rank {value}: vLLM {VLLM_VERSION} accepts only {choices}")
    return value


def vllm_architecture(architectures: list[str] | None) -> tuple[str | None, VllmArchitecture | None]:
    """The base's architecture (config.json ``architectures``) and its vLLM LoRA facts, when lorafuse holds them."""
    for name in architectures or []:
        if name in VLLM_ARCHITECTURES:
            return name, VLLM_ARCHITECTURES[name]
    return (architectures[0] if architectures else None), None


def architecture_refusal(name: str | None) -> str:
    """Why the target modules cannot be checked for ``name``, and what to do."""
    known = ", ".join(sorted(VLLM_ARCHITECTURES))
    what = f"architecture {name}" if name else "no architecture (the base's config.json names none)"
    return f"{what}: lorafuse holds vLLM {VLLM_VERSION}'s LoRA modules for {known} only"


@dataclass
class Finding:
    """One rule's outcome: ``ok`` True (passes), False (vLLM refuses) or None (cannot tell from what was given)."""

    rule: str
    ok: bool | None
    detail: str
    fix: str = ""


@dataclass
class ServingVerdict:
    """Whether ``engine`` serves the adapter as it is: ``servable`` is False when any rule fails, None when none
    fails but one could not be checked."""

    engine: str
    version: str
    findings: list[Finding]

    @property
    def servable(self) -> bool | None:
        if any(f.ok is False for f in self.findings):
            return False
        return None if any(f.ok is None for f in self.findings) else True

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "version": self.version,
            "servable": self.servable,
            "findings": [asdict(f) for f in self.findings],
        }


def check_vllm(
    config: dict[str, Any] | None,
    tensor_shapes: dict[str, tuple[int, ...]],
    weight_files: list[str],
    base_config: dict[str, Any] | None,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
) -> ServingVerdict:
    """vLLM's loader rules applied to a PEFT adapter: its ``adapter_config.json`` (None: not a PEFT folder), its
    tensors' shapes by name, the names of its weight files and the base's ``config.json`` (None: unknown, so the
    rules that depend on the model cannot be checked)."""
    findings = [_format_rule(config, weight_files)]
    if config is not None:
        names = list(tensor_shapes)
        findings += [_rank_rule(config, max_lora_rank), _modules_to_save_rule(config), *_feature_rules(config)]
        findings.append(_tensor_names_rule(names))
        findings.append(_target_rule(names, (base_config or {}).get("architectures")))
        findings.append(_embedding_rule(tensor_shapes, base_config))
    return ServingVerdict("vllm", VLLM_VERSION, findings)


def check_vllm_path(
    path: str | Path, base_config: dict[str, Any] | None, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK
) -> ServingVerdict:
    """:func:`check_vllm` on the adapter at ``path`` (a PEFT folder; anything else fails the format rule)."""
    from .io.checkpoint import Checkpoint
    from .io.extra_files import read_json

    path = Path(path)
    config = read_json(path / "adapter_config.json") if path.is_dir() else None
    files = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
    shapes: dict[str, tuple[int, ...]] = {}
    weights = next((path / f for f in VLLM_WEIGHT_FILES if f in files), None) if config is not None else None
    if weights is not None:
        with Checkpoint([weights]) as checkpoint:
            shapes = {name: tuple(info.shape) for name, info in checkpoint.infos.items()}
    return check_vllm(config, shapes, files, base_config, max_lora_rank)


def _format_rule(config: dict[str, Any] | None, weight_files: list[str]) -> Finding:
    if config is None:
        return Finding(
            "format",
            False,
            "not a PEFT adapter folder: vLLM loads adapter_config.json + adapter_model.safetensors only",
            "extract a PEFT adapter (lorafuse extract BASE MERGED --serving vllm), or save it with PEFT",
        )
    found = [f for f in VLLM_WEIGHT_FILES if f in weight_files]
    if not found:
        return Finding("format", False, f"no {' / '.join(VLLM_WEIGHT_FILES)} in the folder", "save the weights there")
    return Finding("format", True, f"PEFT folder with {found[0]}")


def _rank_rule(config: dict[str, Any], max_lora_rank: int) -> Finding:
    pattern = config.get("rank_pattern") or {}
    ranks = [r for r in [config.get("r"), *pattern.values()] if isinstance(r, int)]
    top = max(ranks, default=0)
    if top <= 0:
        return Finding("rank", False, f"r = {config.get('r')!r}: vLLM needs a positive integer", "set r")
    if top > max_lora_rank:
        allowed = [r for r in VLLM_MAX_LORA_RANKS if r >= top]
        fix = f"serve with --max-lora-rank {allowed[0]}" if allowed else "re-extract at a lower --rank"
        return Finding("rank", False, f"rank {top} > max_lora_rank {max_lora_rank}", fix)
    return Finding("rank", True, f"rank {top} <= max_lora_rank {max_lora_rank}")


def _modules_to_save_rule(config: dict[str, Any]) -> Finding:
    modules = config.get("modules_to_save") or []
    refused = [m for m in modules if m not in VLLM_MODULES_TO_SAVE]
    if refused:
        return Finding(
            "modules_to_save",
            False,
            f"modules_to_save {refused}: vLLM serves only {' or '.join(VLLM_MODULES_TO_SAVE)} (a classifier head)",
            "merge the adapter instead (lorafuse merge), or re-extract without --keep-full/--diff-only",
        )
    return Finding("modules_to_save", True, "none" if not modules else f"{modules} (a classifier head)")


def _feature_rules(config: dict[str, Any]) -> list[Finding]:
    findings = []
    for key, what in VLLM_REFUSED_FEATURES.items():
        if config.get(key):
            fix = "merge the adapter instead (lorafuse merge)"
            if key == "lora_bias":
                fix = "re-extract with --serving vllm (biases are left out and reported), or merge the adapter"
            findings.append(Finding(key, False, f"{what} is set: vLLM does not serve it", fix))
        else:
            findings.append(Finding(key, True, "not used"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        findings.append(
            Finding(
                "init_lora_weights",
                False,
                f"init_lora_weights={init!r} changes the base weights when PEFT loads the adapter",
                "convert it with PEFT's path_initial_model_for_weight_conversion, or set it to true if the served "
                "base already holds the changed weights",
            )
        )
    else:
        findings.append(Finding("init_lora_weights", True, repr(init)))
    bias = config.get("bias", "none")
    if bias != "none":
        findings.append(Finding("bias", False, f"bias={bias!r}: vLLM refuses trained biases", "merge instead"))
    else:
        findings.append(Finding("bias", True, "none"))
    return findings


def _module_name(tensor: str) -> str | None:
    """The module a LoRA tensor belongs to (prefix removed), or None when vLLM cannot parse the name."""
    name = tensor.removeprefix(PEFT_PREFIX)
    for suffix in VLLM_TENSOR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _parsed(tensor: str) -> bool:
    """True when vLLM's loader reads (or deliberately skips) the tensor: LoRA factors, a classifier head's
    ``weight``/``bias`` (parse_fine_tuned_lora_name) and base embeddings (is_base_embedding_weights)."""
    parts = tensor.split(".")
    head = len(parts) >= 2 and parts[-2] in VLLM_MODULES_TO_SAVE and parts[-1] in ("weight", "bias")
    return _module_name(tensor) is not None or head or tensor.endswith(VLLM_SKIPPED_TENSORS)


def _tensor_names_rule(tensor_names: list[str]) -> Finding:
    bad = [t for t in tensor_names if not _parsed(t)]
    if bad:
        return Finding(
            "tensor names",
            False,
            f"{len(bad)} tensor(s) vLLM cannot parse, e.g. {bad[0]} (it reads only "
            f"{', '.join(s.lstrip('.') for s in VLLM_TENSOR_SUFFIXES)})",
            "re-extract with --serving vllm, or merge the adapter instead",
        )
    return Finding("tensor names", True, f"{len(tensor_names)} tensors, all LoRA factors")


def _target_rule(tensor_names: list[str], architectures: list[str] | None) -> Finding:
    name, arch = vllm_architecture(architectures)
    modules = sorted({m for m in map(_module_name, tensor_names) if m})
    if arch is None:
        return Finding(
            "target modules",
            None,
            architecture_refusal(name),
            "pass --base BASE (its config.json names the architecture), or check the model's vLLM file",
        )
    allowed = arch.adapter_modules()
    refused = [m for m in modules if m.rpartition(".")[2] not in allowed]
    if refused:
        leaves = sorted({m.rpartition(".")[2] for m in refused})
        return Finding(
            "target modules",
            False,
            f"{name} in vLLM has no LoRA for {leaves} ({len(refused)} module(s), e.g. {refused[0]}; it takes "
            f"{sorted(allowed)}, {arch.source})",
            "re-extract with --serving vllm (those modules are left out and reported), or merge the adapter",
        )
    return Finding("target modules", True, f"{len(modules)} modules, all in {name}'s LoRA modules")


def _embedding_rule(tensor_shapes: dict[str, tuple[int, ...]], base_config: dict[str, Any] | None) -> Finding:
    """vllm/lora/lora_model.py (from_lora_tensors): lora_embedding_A must span the base's whole vocabulary; vLLM
    0.33.0 has no extra-vocabulary embeddings (new tokens), so a resized vocabulary cannot be served as a LoRA."""
    columns = {name: shape[-1] for name, shape in tensor_shapes.items() if name.endswith(".lora_embedding_A")}
    if not columns:
        return Finding("embedding LoRA", True, "none")
    vocab = (base_config or {}).get("vocab_size")
    if not isinstance(vocab, int):
        return Finding("embedding LoRA", None, "the base's vocab_size is unknown", "pass --base BASE")
    wrong = {name: n for name, n in columns.items() if n != vocab}
    if wrong:
        name, n = next(iter(wrong.items()))
        return Finding(
            "embedding LoRA",
            False,
            f"{name} spans {n} tokens but the base's vocab_size is {vocab} (vLLM has no extra vocabulary)",
            "merge the adapter instead (lorafuse merge) and serve the merged model",
        )
    return Finding("embedding LoRA", True, f"{len(columns)} embedding LoRA(s) over the base's {vocab} tokens")


def render_verdict(verdict: dict[str, Any]) -> list[str]:
    """Readable lines for :meth:`ServingVerdict.to_dict`: the verdict, then each rule that failed or could not be
    checked, with its fix."""
    word = {True: "servable as is", False: "NOT servable", None: "cannot tell"}[verdict["servable"]]
    lines = [f"{verdict['engine']} {verdict['version']}: {word}"]
    for f in verdict["findings"]:
        if f["ok"] is not True:
            mark = "FAIL" if f["ok"] is False else "?"
            lines.append(f"  {mark} {f['rule']}: {f['detail']}" + (f" -> {f['fix']}" if f["fix"] else ""))
    return lines
