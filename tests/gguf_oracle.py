"""llama.cpp's own converters as test oracles, fetched once from the package registry, and tiny models with a
tokenizer built in the test (a byte-level BPE one through ``tokenizers``, a SentencePiece one through
``sentencepiece``) for them to convert.

The converters ship in the llama-cpp-python source distribution (``vendor/llama.cpp/``): ``pip download`` fetches
it once into ``LORAFUSE_TEST_CACHE`` (default ``~/.cache/lorafuse-tests``), or ``LORAFUSE_LLAMA_CPP_SDIST`` names a
copy already on disk. CI has the registry, so these tests run there for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"  # the llama.cpp whose converter lorafuse's GGUF output is checked against
KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")

# Runs a converter with its BPE pre-tokenizer check told about the test's own tokenizer: a tokenizer built in a
# test has a check hash llama.cpp cannot know, and the converter would stop there. LORAFUSE_TEST_PRE names the
# pre-tokenizer to record for an unknown hash; everything else is the converter as it ships.
WRAPPER = """
import os, runpy, sys
here = sys.argv[1]
sys.path.insert(0, here)
sys.path.insert(1, os.path.join(here, "gguf-py"))
pre = os.environ.get("LORAFUSE_TEST_PRE")
if pre:
    import conversion.base as base
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
script = os.path.join(here, sys.argv[2])
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def cache_root() -> Path:
    return Path(os.environ.get("LORAFUSE_TEST_CACHE", Path.home() / ".cache" / "lorafuse-tests"))


def llama_cpp_tree() -> Path:
    """A folder with llama.cpp's converters and its gguf-py, fetched and unpacked once."""
    root = cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        sdist = os.environ.get("LORAFUSE_LLAMA_CPP_SDIST")
        if not sdist:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp],
                check=True, capture_output=True,
            )  # fmt: skip
            sdist = str(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")))
        unpacked = Path(tmp) / "tree"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = []
            for member in archive.getmembers():
                rel = member.name[len(prefix) :] if member.name.startswith(prefix) else None
                if rel and rel.startswith(KEEP) and (member.isfile() or member.isdir()):
                    member.name = rel
                    members.append(member)
            archive.extractall(unpacked, members=members, filter="data")
        try:
            unpacked.rename(root)
        except OSError:  # another test process unpacked it first
            if not (root / "convert_hf_to_gguf.py").is_file():
                raise
    return root


def run_converter(script: str, args: list[str], pre: str | None = None) -> subprocess.CompletedProcess:
    """Run llama.cpp's ``script`` (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``) with ``args``."""
    tree = llama_cpp_tree()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pre:
        env["LORAFUSE_TEST_PRE"] = pre
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(tree), script, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise AssertionError(f"{script} failed:\n{proc.stderr[-3000:]}")
    return proc


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "llama.cpp loads GGUF files; lorafuse merges adapters into them.",
    "Numbers 12345 and 3.14, symbols !? and unicode: caf\u00e9 na\u00efve \u00fcber.",
]


def add_bpe_tokenizer(folder: Path, vocab_size: int = 300) -> int:
    """A byte-level BPE tokenizer (the GPT-2/Qwen kind) trained on a few lines, saved as ``tokenizer.json`` with
    special tokens and a chat template; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                      "rstrip": False, "single_word": False}
            for t in SPECIALS
        },
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def add_sentencepiece_tokenizer(folder: Path, vocab_size: int = 120) -> int:
    """A SentencePiece tokenizer (the Llama-2/Mistral kind) trained on a few lines as ``tokenizer.model``; returns
    its size."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model.getvalue())
    return sp.vocab_size()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    """A GGUF file's key/value pairs and its tensors by name (gguf-py's reader)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        fields[name] = value
    return fields, {t.name: t for t in reader.tensors}


def dequantized(tensor) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
