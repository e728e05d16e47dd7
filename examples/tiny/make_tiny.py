"""Regenerate the tiny example: a Qwen3-shaped base model and a PEFT LoRA adapter for it.

Deterministic (fixed seed) and needs only torch + safetensors. Run from anywhere:
    python examples/tiny/make_tiny.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16


def base_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    base = {}
    for name, shape in base_shapes(CONFIG).items():
        if len(shape) == 1:
            base[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            base[name] = (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)
    (HERE / "base").mkdir(exist_ok=True)
    save_file(base, HERE / "base" / "model.safetensors", metadata={"format": "pt"})
    (HERE / "base" / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (HERE / "base" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")

    adapter = {}
    for name, shape in base_shapes(CONFIG).items():
        module = name.rsplit(".", 1)[0]
        if len(shape) != 2 or module.rsplit(".", 1)[1] not in TARGETS:
            continue
        out_f, in_f = shape
        prefix = f"base_model.model.{module}"
        adapter[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=gen) * 0.1).to(torch.bfloat16)
        adapter[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=gen) * 0.1).to(torch.bfloat16)
    (HERE / "adapter").mkdir(exist_ok=True)
    save_file(adapter, HERE / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "examples/tiny/base",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": TARGETS,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (HERE / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {HERE / 'base'} and {HERE / 'adapter'}")


if __name__ == "__main__":
    main()
