"""Bad input fails before anything is written, with one clear line naming the file or key (CLI: exit 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_llama, make_peft_adapter, read_tensors
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseError

ADAPTER_FILE = "adapter_model.safetensors"
LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 123456\n"
)


@pytest.fixture(scope="module")
def adapter(llama_untied, tmp_path_factory) -> Path:
    return make_peft_adapter(
        llama_untied, tmp_path_factory.mktemp("err") / "adapter", target_modules=["q_proj", "v_proj"]
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_adapter_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / ADAPTER_FILE)
    change(tensors)
    save_file(tensors, folder / ADAPTER_FILE)


def _edit_adapter_config(folder: Path, **updates) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(updates)
    path.write_text(json.dumps(config))


def _run_cli(capsys, base: Path, adapters: list[Path], out: Path, *extra: str) -> tuple[int, str]:
    code = main(["merge", str(base), *map(str, adapters), "-o", str(out), *extra])
    return code, capsys.readouterr().err


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if "lorafuse-tmp" in p.name or "lorafuse-old" in p.name]
    assert leftovers == []


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("lorafuse: error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# Each case prepares (base, adapters, extra CLI args) in tmp_path and names what the error line must contain.
def _wrong_base(tmp, base, adapter):
    other = make_llama(tmp, hidden_size=48, name="other-base")
    return other, [adapter], [], ["model.layers.0.self_attn.q_proj", "(32, 32)", "(48, 48)", "base model"]


def _missing_target(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")

    def add(t):
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 32)
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.randn(32, 4)

    _edit_adapter_tensors(bad, add)
    return base, [bad], [], ["model.layers.9.self_attn.q_proj", "does not have"]


def _nan(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")

    def poison(t):
        t["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"][0, 3] = float("nan")

    _edit_adapter_tensors(bad, poison)
    return base, [bad], [], [ADAPTER_FILE, "layers.1.self_attn.v_proj.lora_A.weight", "NaN"]


def _inf(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")
    _edit_adapter_tensors(
        bad, lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(float("inf"))
    )
    return base, [bad], [], [ADAPTER_FILE, "layers.0.self_attn.q_proj.lora_B.weight", "Inf"]


def _lfs_adapter(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")
    (bad / ADAPTER_FILE).write_text(LFS_POINTER)
    return base, [bad], [], [str(bad / ADAPTER_FILE), "Git LFS pointer", "git lfs pull"]


def _lfs_base(tmp, base, adapter):
    bad = _copy(base, tmp / "bad-base")
    (bad / "model.safetensors").write_text(LFS_POINTER)
    return bad, [adapter], [], [str(bad / "model.safetensors"), "Git LFS pointer"]


def _truncated_base(tmp, base, adapter):
    bad = _copy(base, tmp / "bad-base")
    path = bad / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return bad, [adapter], [], [str(path), "truncated"]


def _truncated_adapter(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")
    path = bad / ADAPTER_FILE
    path.write_bytes(path.read_bytes()[:-7])
    return base, [bad], [], [str(path), "truncated"]


def _corrupt_header(tmp, base, adapter):
    bad = _copy(base, tmp / "bad-base")
    path = bad / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"}{not json!!"
    path.write_bytes(bytes(data))
    return bad, [adapter], [], [str(path), "corrupt"]


def _unknown_tuner(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")
    _edit_adapter_config(bad, peft_type="NO_SUCH_TUNER")
    return base, [bad], [], ["adapter_config.json", "NO_SUCH_TUNER", "not a PEFT tuner type lorafuse knows"]


def _unknown_lora_key(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")
    _edit_adapter_tensors(
        bad, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight": torch.ones(2)})
    )
    return base, [bad], [], [ADAPTER_FILE, "q_proj.lora_C.weight"]


def _unsupported_flag(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")
    _edit_adapter_config(bad, use_qalora=True)
    return base, [bad], [], ["adapter_config.json", "use_qalora"]


def _weights_count(tmp, base, adapter):
    return base, [adapter, adapter], ["--weight", "0.5"], ["1 weights for 2 adapters"]


def _fp16_overflow(tmp, base, adapter):
    big = _copy(base, tmp / "big-base")
    tensors = read_tensors(big)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e6  # untouched by the adapter, still must fit fp16
    save_file(tensors, big / "model.safetensors")
    return big, [adapter], ["--dtype", "fp16"], ["model.layers.1.mlp.up_proj.weight", "float16", "--dtype bf16"]


def _fp16_overflow_after_merge(tmp, base, adapter):
    strong = _copy(adapter, tmp / "strong")
    _edit_adapter_tensors(
        strong, lambda t: t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].fill_(1e6)
    )
    return base, [strong], ["--dtype", "fp16"], ["model.layers.0.self_attn.v_proj.weight", "float16"]


def _missing_lora_b(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")
    _edit_adapter_tensors(bad, lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"))
    return base, [bad], [], [ADAPTER_FILE, "model.layers.1.self_attn.q_proj", "lora_B"]


def _missing_base(tmp, base, adapter):
    return tmp / "no-such-model", [adapter], [], [str(tmp / "no-such-model"), "does not exist"]


def _missing_adapter(tmp, base, adapter):
    return base, [tmp / "no-such-adapter"], [], [str(tmp / "no-such-adapter"), "does not exist"]


def _corrupt_adapter_config(tmp, base, adapter):
    bad = _copy(adapter, tmp / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    return base, [bad], [], [str(bad / "adapter_config.json"), "JSON"]


ERROR_CASES = {
    "missing-lora-b": _missing_lora_b,
    "base-does-not-exist": _missing_base,
    "adapter-does-not-exist": _missing_adapter,
    "adapter-config-not-json": _corrupt_adapter_config,
    "wrong-base-model": _wrong_base,
    "target-missing-from-base": _missing_target,
    "nan-in-adapter": _nan,
    "inf-in-adapter": _inf,
    "lfs-pointer-adapter": _lfs_adapter,
    "lfs-pointer-base": _lfs_base,
    "truncated-base": _truncated_base,
    "truncated-adapter": _truncated_adapter,
    "corrupt-header": _corrupt_header,
    "peft-type-unknown": _unknown_tuner,
    "unknown-lora-key": _unknown_lora_key,
    "unsupported-config-flag": _unsupported_flag,
    "weights-count-mismatch": _weights_count,
    "fp16-overflow-untouched": _fp16_overflow,
    "fp16-overflow-merged": _fp16_overflow_after_merge,
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cli_error_is_one_line_and_writes_nothing(case, llama_untied, adapter, tmp_path, capsys):
    base, adapters, extra, fragments = ERROR_CASES[case](tmp_path, llama_untied, adapter)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    code, err = _run_cli(capsys, base, adapters, out, *extra)
    _assert_one_line_error(code, err, *fragments)
    _assert_nothing_written(out)
    # The API raises the same error type.
    weights = [1.0] * len(adapters) if "--weight" not in extra else [0.5]
    dtype = extra[extra.index("--dtype") + 1] if "--dtype" in extra else "auto"
    with pytest.raises(LorafuseError):
        lorafuse.merge(base, adapters, out, weights=weights, dtype=dtype)
    _assert_nothing_written(out)


def test_pooler_adapter_on_checkpoint_without_pooler(bert, tmp_path, capsys):
    """An adapter trained on BertModel (which has a pooler) cannot merge into an MLM checkpoint that has none."""
    from transformers import AutoModel

    adapter = make_peft_adapter(bert, tmp_path / "adapter", model_cls=AutoModel, target_modules=["query", "dense"])
    out = tmp_path / "merged"
    code, err = _run_cli(capsys, bert, [adapter], out)
    _assert_one_line_error(code, err, "pooler.dense", "does not have")
    _assert_nothing_written(out)


def test_unmatched_target_module_warns(llama_untied, adapter, tmp_path, caplog):
    odd = _copy(adapter, tmp_path / "odd")
    _edit_adapter_config(odd, target_modules=["q_proj", "v_proj", "nonexistent_proj"])
    out = tmp_path / "merged"
    report = lorafuse.merge(llama_untied, [odd], out)
    assert [w for w in report.warnings if "nonexistent_proj" in w]
    assert not [w for w in report.warnings if "q_proj" in w or "v_proj" in w]
    caplog.clear()
    code = main(["merge", str(llama_untied), str(odd), "-o", str(tmp_path / "cli"), "--json"])
    assert code == 0
    assert [r for r in caplog.records if r.levelname == "WARNING" and "nonexistent_proj" in r.getMessage()]


def test_all_zero_lora_b_warns(llama_untied, tmp_path):
    zero = make_peft_adapter(
        llama_untied, tmp_path / "zero", target_modules=["q_proj"], init_lora_weights=True, randomize=False
    )
    out = tmp_path / "merged"
    report = lorafuse.merge(llama_untied, [zero], out)
    assert [w for w in report.warnings if "all zeros" in w and "changes nothing" in w]
    base, merged = read_tensors(llama_untied), read_tensors(out)
    assert all(torch.equal(merged[k], base[k]) for k in base)


def test_non_empty_output_refused_then_overwritten(llama_untied, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = _run_cli(capsys, llama_untied, [adapter], out)
    _assert_one_line_error(code, err, str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    code, _ = _run_cli(capsys, llama_untied, [adapter], out, "--overwrite")
    assert code == 0
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_output_folder_is_used(llama_untied, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    code, _ = _run_cli(capsys, llama_untied, [adapter], out)
    assert code == 0 and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("target", ["base", "adapter", "inside-base"])
def test_output_never_replaces_an_input(target, llama_untied, adapter, tmp_path, capsys):
    base = _copy(llama_untied, tmp_path / "base")
    adapter_copy = _copy(adapter, tmp_path / "adapter")
    before = {p: p.read_bytes() for p in [*base.iterdir(), *adapter_copy.iterdir()] if p.is_file()}
    out = {"base": base, "adapter": adapter_copy, "inside-base": base / "merged"}[target]
    code, err = _run_cli(capsys, base, [adapter_copy], out, "--overwrite")
    # Not even a sub-folder of the base (issue 15): the next merge of that base would ship it as an extra file.
    _assert_one_line_error(code, err, "input")
    assert {p: p.read_bytes() for p in before} == before
