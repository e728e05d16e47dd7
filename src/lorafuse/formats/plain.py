"""Plain ``lora_A``/``lora_B`` files without PEFT's ``base_model.model.`` prefix (diffusers-style).

``<module>.lora_A.weight`` (down) and ``<module>.lora_B.weight`` (up), or diffusers' older layouts
(``...processor.to_q_lora.down.weight``, ``<module>.lora.up.weight``, ``<module>.lora_linear_layer.up.weight``:
:mod:`lorafuse.names.diffusers_old`). The scale of each module is alpha / rank
(PEFT's, alpha / sqrt(rank) with rsLoRA), where alpha comes from an optional ``<module>.alpha`` tensor or from the
LoRA configs diffusers (0.34 and later) stores in the safetensors ``__metadata__`` under ``lora_adapter_metadata``:
one JSON object, either one LoraConfig (a model's ``save_lora_adapter``) or ``<component>.<field>`` keys, one
LoraConfig per pipeline component (``unet.lora_alpha``, ``text_encoder.alpha_pattern``, ...). Without either the
scale is 1. Head prefixes such as ``unet.`` or ``transformer.`` are matched onto the base's names like any other
prefix difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..names import Layout, diffusers_old
from ..peft_flags import AdapterConfig, config_object, parse_config
from ..plan import AdapterInput
from .lowrank import LowRankAdapter, ShapeOf, read_lowrank
from .registry import AdapterFormat, ReadContext, register_format
from .single import keys_sniffer, read_single

SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}
SNIFF_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
READ_SUFFIXES = SUFFIXES | diffusers_old.SUFFIXES
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
# Keys of one LoraConfig stored whole (not per component).
CONFIG_FIELDS = ("r", "lora_alpha", "peft_type")


def metadata_configs(metadata: Mapping[str, str], source: str) -> dict[str, AdapterConfig] | None:
    """The LoRA configs in a file's ``__metadata__``, by component name (``""``: one config for every module);
    None when the file has none. Each is checked as ``adapter_config.json`` is."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    where = f"{source}: __metadata__ {METADATA_KEY}"
    data = config_object(raw, where)
    if any(key in data for key in CONFIG_FIELDS):
        grouped = {"": data}
    else:
        grouped: dict[str, dict] = {}
        for key, value in data.items():
            component, _, name = key.rpartition(".")
            if not component:
                raise AdapterError(f"{where}: key {key!r} is neither a LoraConfig field nor <component>.<field>")
            grouped.setdefault(component, {})[name] = value
    configs = {}
    for component, fields in grouped.items():
        what = f"{where}" + (f" ({component})" if component else "")
        config = parse_config(fields, what)
        if config.peft_type != "LORA" or config.use_dora:
            kind = "DoRA" if config.use_dora else config.peft_type
            raise AdapterError(
                f"{what}: a {kind} adapter's config, but the file holds plain lora_A/lora_B tensors: the file is "
                "inconsistent; re-export it"
            )
        configs[component] = config
    return configs


def metadata_scales(checkpoint: Checkpoint, source: str) -> Callable[[str, str, int], float] | None:
    """``scale_of(module, key, rank)`` from the file's diffusers LoRA configs; None when it has none."""
    configs = metadata_configs(checkpoint.metadata, source)
    if configs is None:
        return None

    def scale_of(module: str, key: str, rank: int) -> float:
        if "" in configs:
            return configs[""].scaling(module, rank)
        # The longest component prefix: "text_encoder_2." before "text_encoder.".
        found = [c for c in configs if module.startswith(c + ".")]
        if not found:
            raise AdapterError(
                f"{source}: {key!r} belongs to no component of the file's {METADATA_KEY} "
                f"({', '.join(sorted(configs))}), so its lora_alpha is unknown; re-export the adapter"
            )
        component = max(found, key=len)
        return configs[component].scaling(module[len(component) + 1 :], rank)

    return scale_of


def read_plain(
    checkpoint: Checkpoint, label: str, layout: Layout | None = None, shape_of: ShapeOf | None = None
) -> LowRankAdapter:
    """Read a plain lora_A/lora_B file into edits targeting ``<module>.weight``."""
    del layout  # names are the base's own, up to the head prefix the plan matches
    source = str(checkpoint.files[0])
    scale_of = metadata_scales(checkpoint, source)

    def resolve(module: str, key: str) -> str:
        if key.endswith(SNIFF_SUFFIXES) or not key.endswith(tuple(diffusers_old.SUFFIXES)):
            return module
        target = diffusers_old.module_of(module)
        if target is None:
            raise AdapterError(
                f"{source}: tensor {key!r} is not a LoRA tensor this format understands (expected names ending in "
                ".lora_A.weight/.lora_B.weight or diffusers' older .lora.up.weight, _lora.up.weight, "
                ".lora_linear_layer.up.weight); pass --adapter-format if it was misdetected"
            )
        return target

    return read_lowrank(checkpoint, label, READ_SUFFIXES, resolve=resolve, shape_of=shape_of, scale_of=scale_of)


def read(path: Path, context: ReadContext) -> AdapterInput:
    """Read the plain lora_A/lora_B file at ``path``."""
    return read_single(path, context, "plain", read_plain)


FORMAT = register_format(
    AdapterFormat(
        "plain",
        sniff=keys_sniffer(lambda key: key.endswith(SNIFF_SUFFIXES) or diffusers_old.is_old_key(key)),
        read=read,
        priority=30,
    )
)
