"""Train a LoRA on a toy task without PEFT, save it as a PEFT adapter and merge it with lorafuse.

The task: a tiny Llama learns to predict ``(token + 1) % vocab`` at every position. Runs on CPU in seconds:

    python examples/train_toy_lora.py [WORKDIR] [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import lorafuse
from lorafuse.runtime import inject_lora, save_adapter

VOCAB = 64


def toy_batch(generator: torch.Generator, batch: int = 32, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    return ids, (ids + 1) % VOCAB


def main(workdir: Path, steps: int = 40) -> dict[str, float]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(workdir / "base")  # the base model as a user would have it on disk

    wrapped = inject_lora(
        model, target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"], rank=8, alpha=16
    )
    print(
        f"wrapped {len(wrapped)} layers; trainable parameters:",
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )

    generator = torch.Generator().manual_seed(0)
    test_ids, test_labels = toy_batch(torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with torch.no_grad():
        start_loss = F.cross_entropy(model(test_ids).logits.flatten(0, 1), test_labels.flatten()).item()
    for _ in range(steps):
        ids, labels = toy_batch(generator)
        loss = F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(test_ids).logits
    end_loss = F.cross_entropy(trained.flatten(0, 1), test_labels.flatten()).item()
    accuracy = (trained.argmax(-1) == test_labels).float().mean().item()
    print(f"held-out loss {start_loss:.3f} -> {end_loss:.3f}, accuracy {accuracy:.2f}")

    save_adapter(model, workdir / "adapter")
    lorafuse.merge(workdir / "base", [workdir / "adapter"], workdir / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(workdir / "merged").eval()
    with torch.no_grad():
        difference = (merged(test_ids).logits - trained).abs().max().item()
    print(f"merged model vs. trained LoRA model: max logit difference {difference:.2e}")
    return {"start_loss": start_loss, "end_loss": end_loss, "accuracy": accuracy, "difference": difference}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="folder for base/, adapter/ and merged/ (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if args.workdir:
        main(Path(args.workdir), args.steps)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp), args.steps)
