"""The tokenizer of a GGUF file, read from a transformers model folder the way llama.cpp's ``convert_hf_to_gguf.py``
records it: token texts, scores and types, the merges, special token ids, the chat template and the BPE
pre-tokenizer name (:mod:`lorafuse.gguf_pretokenizers`).

Readers are tried in the architecture's order (names/gguf.py); ``sentencepiece`` and ``llama_hf`` give up (to the
next reader) when their files are absent, as the converter's do.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

from .errors import LorafuseError
from .gguf_pretokenizers import CHECK_TEXT, PRE_TOKENIZERS
from .names.gguf import GGUF_EXTRA, GGUFArch, require_gguf

SPACE_MARK = "\u2581"  # SentencePiece's visible space


class NotThisReader(Exception):
    """The folder lacks what a tokenizer reader needs: the next one is tried."""


def looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special, which llama.cpp treats as control tokens anyway."""
    if token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    pairs = (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))
    return any(token.startswith(a) and token.endswith(b) for a, b in pairs)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _sentencepiece_pieces(sp: Any, size: int, folder: Path, types: Any) -> tuple[list[bytes], list[float], list[Any]]:
    """``size`` (tokens, scores, types) from a SentencePiece model, padded with ``[PADn]`` as the converter pads
    them, then ``added_tokens.json``'s tokens (ids past ``size`` skipped, as the converter skips them)."""
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [-10000.0] * size
    kinds = [types.UNUSED] * size
    for i in range(min(size, sp.vocab_size())):
        kind = types.NORMAL
        if sp.IsUnknown(i):
            kind = types.UNKNOWN
        elif sp.IsControl(i):
            kind = types.CONTROL
        elif sp.IsUnused(i):
            kind = types.UNUSED
        elif sp.IsByte(i):
            kind = types.BYTE
        tokens[i], scores[i], kinds[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind
    for text, i in (_read_json(folder / "added_tokens.json") or {}).items():
        if i < size:
            tokens[i], scores[i], kinds[i] = text.encode(), -1000.0, types.USER_DEFINED
    return tokens, scores, kinds


def _sentencepiece(writer: Any, folder: Path, hparams: dict[str, Any]) -> None:
    gguf = require_gguf()
    model = folder / "tokenizer.model"
    if not model.is_file():
        raise NotThisReader
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise LorafuseError(f"{model} is a SentencePiece tokenizer: {GGUF_EXTRA} (sentencepiece)") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model))
    types = gguf.TokenType
    size = hparams.get("vocab_size_per_layer_input") or hparams.get("vocab_size") or sp.vocab_size()
    tokens, scores, kinds = _sentencepiece_pieces(sp, size, folder, types)
    decoder = (_read_json(folder / "tokenizer_config.json") or {}).get("added_tokens_decoder", {})
    for key, data in decoder.items():
        i, text = int(key), data["content"]
        if i >= size:
            continue
        if data.get("special") or looks_special(text):
            kinds[i] = types.CONTROL
        else:
            text = text.replace(SPACE_MARK, " ")  # llama.cpp expects user-defined tokens pre-normalized
            kinds[i] = types.USER_DEFINED
        tokens[i], scores[i] = text.encode(), -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)


def _llama_hf(writer: Any, folder: Path, hparams: dict[str, Any]) -> None:
    gguf = require_gguf()
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError):  # no tokenizer.json, or not a llama-style one
        raise NotThisReader from None
    tokens, scores, kinds = zip(*vocab.all_tokens()) if vocab.vocab_size else ((), (), ())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(kinds))
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)


def pre_tokenizer(tokenizer: Any, folder: Path) -> str:
    """llama.cpp's name for the tokenizer's BPE pre-tokenizer; a one-line error for one it does not know (llama.cpp
    would split text differently from the model's training)."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise LorafuseError(
            f"the BPE pre-tokenizer of {folder} is not one llama.cpp knows (check hash {digest}): llama.cpp's "
            "convert_hf_to_gguf_update.py must add it first"
        )
    return name


def _gpt2(writer: Any, folder: Path, hparams: dict[str, Any]) -> None:
    gguf = require_gguf()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise LorafuseError(f"reading the BPE tokenizer of {folder} needs transformers: {GGUF_EXTRA}") from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.vocab
    size = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= size:
        raise LorafuseError(f"the tokenizer of {folder} has ids beyond the config's vocab_size {size}")
    pre = pre_tokenizer(tokenizer, folder)
    by_id = {i: text for text, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    kinds: list[int] = []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if text in added:
            if not decoder[i].normalized:  # llama.cpp assumes added tokens are pre-normalized
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            if decoder[i].special or looks_special(text):
                kind = gguf.TokenType.CONTROL
            else:
                text = text.replace(SPACE_MARK, " ")
                kind = gguf.TokenType.USER_DEFINED
        tokens.append(text)
        kinds.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer)


def _phi3(writer: Any, folder: Path, hparams: dict[str, Any]) -> None:
    """Phi-3's own reader: a GPT2Tokenizer folder (Phi-4) is read as BPE; else ``tokenizer.model`` padded to the
    config's vocab_size, then the added tokens of ``added_tokens.json``, ``tokenizer_config.json`` and
    ``tokenizer.json`` in that order, each user-defined (control when marked special), texts as written."""
    gguf = require_gguf()
    config = _read_json(folder / "tokenizer_config.json")
    if config is not None and config.get("tokenizer_class") == "GPT2Tokenizer":
        _gpt2(writer, folder, hparams)
        return
    model = folder / "tokenizer.model"
    if not model.is_file():
        raise LorafuseError(f"{model} is missing: llama.cpp's Phi-3 conversion reads a SentencePiece tokenizer")
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise LorafuseError(f"{model} is a SentencePiece tokenizer: {GGUF_EXTRA} (sentencepiece)") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model))
    types = gguf.TokenType
    size = hparams.get("vocab_size", sp.vocab_size())
    if sp.vocab_size() > size:
        raise LorafuseError(f"{model} has {sp.vocab_size()} tokens, more than the config's vocab_size {size}")
    tokens, scores, kinds = _sentencepiece_pieces(sp, size, folder, types)
    added = [(int(k), d) for k, d in ((config or {}).get("added_tokens_decoder") or {}).items()]
    added += [(int(d["id"]), d) for d in (_read_json(folder / "tokenizer.json") or {}).get("added_tokens", [])]
    for i, data in added:
        if not 0 <= i < size:  # the converter would stop with an IndexError
            raise LorafuseError(f"added token {data['content']!r} of {folder} has id {i}, past vocab_size {size}")
        tokens[i], scores[i] = data["content"].encode(), -1000.0
        kinds[i] = types.CONTROL if data.get("special") else types.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)


def real_vocab_size(folder: Path, hparams: dict[str, Any]) -> int:
    """How many embedding rows have a token (Gemma3's GGUF keeps only those): a SentencePiece vocabulary is padded
    to the config's size; a tokenizer.json has its vocabulary plus its added tokens."""
    if (folder / "tokenizer.model").is_file():
        return int(hparams.get("vocab_size_per_layer_input") or hparams.get("vocab_size") or 0) or _spm_size(folder)
    data = _read_json(folder / "tokenizer.json")
    if data is None:
        raise LorafuseError(f"{folder} holds no tokenizer (tokenizer.model or tokenizer.json): GGUF needs one")
    return len(data["model"]["vocab"]) + len(data.get("added_tokens", []))


def _spm_size(folder: Path) -> int:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    return sp.vocab_size()


READERS = {"sentencepiece": _sentencepiece, "llama_hf": _llama_hf, "gpt2": _gpt2, "phi3": _phi3}


def add_vocab(writer: Any, folder: Path, spec: GGUFArch, hparams: dict[str, Any]) -> None:
    """Add the tokenizer of model ``folder`` to the ``gguf.GGUFWriter``, with the first of the architecture's
    readers that applies; a one-line error when the folder holds no tokenizer."""
    if spec.llama_params:
        config = _read_json(folder / "tokenizer_config.json") or {}
        if (folder / "tekken.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise LorafuseError(f"{folder}: Mistral's tekken tokenizer is not implemented for GGUF output")
        if config.get("tokenizer_class") == "HybridDNATokenizer":
            raise LorafuseError(f"{folder}: the HybridDNA tokenizer is not implemented for GGUF output")
        if (prefix := config.get("add_prefix_space")) is not None:
            writer.add_add_space_prefix(prefix)
    for name in spec.vocab:
        try:
            READERS[name](writer, folder, hparams)
        except NotThisReader:
            continue
        except OSError as exc:
            raise LorafuseError(f"cannot read the tokenizer of {folder}: {exc}") from None
        break
    else:
        raise LorafuseError(f"{folder} holds no tokenizer (tokenizer.model or tokenizer.json): GGUF needs one")
    if spec.space_prefix is not None and name == "sentencepiece":
        writer.add_add_space_prefix(spec.space_prefix)
    if spec.llama_params and hparams.get("vocab_size") == 49152:  # granite small models, as the converter does
        writer.add_add_bos_token(False)
