"""What ``lorafuse merge`` writes: shards and index, .bin output, the base layouts it reads, copied files,
provenance, dry runs, dtypes, and an atomic result when the merge dies halfway."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import input_ids, make_llama, make_peft_adapter, read_tensors
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.math_threads import math_threads

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter(llama_untied, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_untied, tmp_path_factory.mktemp("out") / "adapter", target_modules=ALL_LINEAR)


@pytest.fixture(scope="module")
def reference(llama_untied, adapter, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The merged tensors written as one safetensors file: every other layout must hold exactly these."""
    out = tmp_path_factory.mktemp("ref") / "merged"
    lorafuse.merge(llama_untied, [adapter], out)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    return read_tensors(out)


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids()).logits


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_sharded_safetensors_with_index(llama_untied, adapter, reference, tmp_path):
    out = tmp_path / "merged"
    report = lorafuse.merge(llama_untied, [adapter], out, max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference)
    total = 0
    for name in shards:
        with safe_open(out / name, "pt") as handle:
            for key in handle.keys():
                assert index["weight_map"][key] == name
                tensor = handle.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
                assert (out / name).stat().st_size <= 20_000 + 4096 or len(list(handle.keys())) == 1
    assert index["metadata"]["total_size"] == total == sum(t.numel() * t.element_size() for t in reference.values())
    _assert_same_tensors(read_tensors(out), reference)
    assert set(report.files) == {*shards, "model.safetensors.index.json"}
    torch.testing.assert_close(_logits(out), _logits_of(reference, llama_untied, tmp_path), rtol=0, atol=0)


def _logits_of(tensors: dict[str, torch.Tensor], base: Path, tmp: Path) -> torch.Tensor:
    from safetensors.torch import save_file

    folder = tmp / "reference-model"
    folder.mkdir()
    shutil.copy(base / "config.json", folder / "config.json")
    save_file(tensors, folder / "model.safetensors")
    return _logits(folder)


@pytest.mark.parametrize("shard", ["5GB", "20KB"], ids=["single", "sharded"])
def test_bin_output_loads(shard, llama_untied, adapter, reference, tmp_path):
    out = tmp_path / "merged"
    lorafuse.merge(llama_untied, [adapter], out, out_format="bin", max_shard_size=shard)
    assert not list(out.glob("*.safetensors"))
    bins = sorted(out.glob("pytorch_model*.bin"))
    tensors: dict[str, torch.Tensor] = {}
    for path in bins:
        tensors.update(torch.load(path, weights_only=True))
    _assert_same_tensors(tensors, reference)
    if shard == "5GB":
        assert [p.name for p in bins] == ["pytorch_model.bin"]
    else:
        assert len(bins) > 2
        index = json.loads((out / "pytorch_model.bin.index.json").read_text())
        assert set(index["weight_map"]) == set(reference)
        assert set(index["weight_map"].values()) == {p.name for p in bins}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    torch.testing.assert_close(_logits(out), _logits_of(reference, llama_untied, tmp_path), rtol=0, atol=0)


def test_sharded_safetensors_base(llama_untied, adapter, reference, tmp_path):
    base = make_llama(tmp_path, tie=False, name="sharded-base", save_kwargs={"max_shard_size": "30KB"})
    assert (base / "model.safetensors.index.json").is_file() and len(list(base.glob("*.safetensors"))) > 1
    _assert_same_tensors(read_tensors(base), read_tensors(llama_untied))
    out = tmp_path / "merged"
    report = lorafuse.merge(base, [adapter], out)
    _assert_same_tensors(read_tensors(out), reference)
    # The base's own shard index is not carried over next to ours.
    assert report.files == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()


def test_pytorch_model_bin_base(llama_untied, adapter, reference, tmp_path):
    base = tmp_path / "bin-base"
    base.mkdir()
    shutil.copy(llama_untied / "config.json", base / "config.json")
    torch.save(read_tensors(llama_untied), base / "pytorch_model.bin")
    out = tmp_path / "merged"
    lorafuse.merge(base, [adapter], out)
    _assert_same_tensors(read_tensors(out), reference)
    assert not (out / "pytorch_model.bin").exists()


def test_single_safetensors_file_base(llama_untied, adapter, reference, tmp_path):
    out = tmp_path / "merged.safetensors"
    report = lorafuse.merge(llama_untied / "model.safetensors", [adapter], out)
    assert out.is_file() and report.files == ["merged.safetensors"]
    with safe_open(out, "pt") as handle:
        _assert_same_tensors({k: handle.get_tensor(k) for k in handle.keys()}, reference)
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]


def test_single_file_keeps_base_metadata_and_adds_provenance(llama_untied, adapter, tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base.safetensors"
    save_file(read_tensors(llama_untied), base, metadata={"format": "pt", "origin": "tiny-llama"})
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(base, [adapter], out, weights=[0.5], conv1d_modules="none")  # no config.json beside it
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and metadata["origin"] == "tiny-llama"
    record = json.loads(metadata["lorafuse_merge"])
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert record["adapters"] == [{"weight": 0.5, "format": "peft", "files": {"adapter_model.safetensors": digest}}]
    assert record["lorafuse_version"] == lorafuse.__version__
    # no paths or timings: the same merge into another path is the same bytes
    again = tmp_path / "elsewhere" / "m.safetensors"
    again.parent.mkdir()
    lorafuse.merge(base, [adapter], again, weights=[0.5], conv1d_modules="none")
    assert again.read_bytes() == out.read_bytes()


def test_non_weight_files_are_copied(llama_untied, adapter, tmp_path):
    base = shutil.copytree(llama_untied, tmp_path / "base")
    extras = {
        "tokenizer.json": '{"version": "1.0"}',
        "tokenizer_config.json": '{"model_max_length": 64}',
        "special_tokens_map.json": "{}",
        "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "modeling_custom.py": "CUSTOM = 1\n",
        "README.md": "# tiny\n",
        "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
    }
    for name, text in extras.items():
        (base / name).parent.mkdir(exist_ok=True)
        (base / name).write_text(text)
    (base / ".cache").mkdir()
    (base / ".cache" / "junk").write_text("x")
    out = tmp_path / "merged"
    report = lorafuse.merge(base, [adapter], out)
    for name, text in extras.items():
        if name != "README.md":  # the merged model's own card replaces the base's (tests/test_model_card.py)
            assert (out / name).read_text() == text, name
    assert not (out / ".cache").exists()
    assert {"tokenizer.json", "1_Pooling", "config.json", "generation_config.json"} <= set(report.copied_files)
    assert "model.safetensors" not in report.copied_files


def test_provenance_file(llama_untied, adapter, tmp_path):
    second = make_peft_adapter(llama_untied, tmp_path / "second", target_modules=["q_proj"], seed=9)
    out = tmp_path / "merged"
    lorafuse.merge(llama_untied, [adapter, second], out, weights=[1.0, 0.25], dtype="bf16")
    record = json.loads((out / "lorafuse_merge.json").read_text())
    assert record["base"] == str(llama_untied)
    assert [a["path"] for a in record["adapters"]] == [str(adapter), str(second)]
    assert [a["weight"] for a in record["adapters"]] == [1.0, 0.25]
    for entry, folder in zip(record["adapters"], [adapter, second]):
        digest = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert entry["files"] == {"adapter_model.safetensors": digest}
    assert record["dtype"] == "bfloat16"
    assert record["lorafuse_version"] == lorafuse.__version__
    assert record["files"] == ["model.safetensors"]


def test_dry_run_writes_nothing(llama_untied, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert (
        main(["merge", str(llama_untied), str(adapter), "-o", str(out), "--dry-run", "--max-shard-size", "20KB"]) == 0
    )
    printed = capsys.readouterr().out
    assert "would write" in printed and "14 of 21 tensors changed" in printed
    assert "model-00001-of-" in printed
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["merge", str(llama_untied), str(adapter), "-o", str(out), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["files"] == ["model.safetensors"] and report["tensors_touched"] == 14
    assert not out.exists()


@pytest.mark.parametrize(
    "dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_dtype_option_sets_tensors_and_config(dtype, torch_dtype, llama_bf16, tmp_path, capsys):
    adapter = make_peft_adapter(llama_bf16, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "merged"
    assert main(["merge", str(llama_bf16), str(adapter), "-o", str(out), "--dtype", dtype]) == 0
    tensors = read_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(torch_dtype).removeprefix("torch.")
    # Untouched tensors are converted exactly (bf16 -> fp32 -> the target dtype rounds once).
    base = read_tensors(llama_bf16)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(tensors[key], base[key].to(torch_dtype))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch_dtype


def test_auto_dtype_keeps_bits_of_untouched_tensors(llama_bf16, tmp_path):
    adapter = make_peft_adapter(llama_bf16, tmp_path / "adapter", target_modules=["v_proj"])
    out = tmp_path / "merged"
    lorafuse.merge(llama_bf16, [adapter], out)
    base, merged = read_tensors(llama_bf16), read_tensors(out)
    for key in base:
        assert merged[key].dtype == torch.bfloat16
        assert torch.equal(merged[key], base[key]) == ("v_proj" not in key), key
    assert json.loads((out / "config.json").read_text()) == json.loads((llama_bf16 / "config.json").read_text())


def _crash_on_fifth_read(monkeypatch, base_file: Path) -> list[Path]:
    """Interrupt the merge (as Ctrl-C would) when it reads its 5th base tensor.

    Every path of the engine (kernel copy, row-block merge, whole-tensor math, .bin output) reads each base tensor
    through ``Checkpoint.fd``, so this hook lands mid-write whichever path a tensor takes.
    """
    from lorafuse.io.checkpoint import Checkpoint

    reads: list[Path] = []
    original = Checkpoint.fd

    def interrupted(self, path):
        if Path(path) == base_file:
            reads.append(path)
            if len(reads) == 5:
                raise KeyboardInterrupt
        return original(self, path)

    monkeypatch.setattr(Checkpoint, "fd", interrupted)
    return reads


@pytest.mark.parametrize("out_format", ["safetensors", "bin", "single-file"])
def test_crash_mid_write_leaves_no_output(out_format, llama_untied, adapter, tmp_path, monkeypatch, capsys):
    reads = _crash_on_fifth_read(monkeypatch, llama_untied / "model.safetensors")
    if out_format == "single-file":
        base, out, extra = llama_untied / "model.safetensors", tmp_path / "merged.safetensors", []
    else:
        base, out, extra = llama_untied, tmp_path / "merged", ["--format", out_format]
    code = main(["merge", str(base), str(adapter), "-o", str(out), *extra])
    assert code == 130 and "nothing was written" in capsys.readouterr().err
    assert 5 <= len(reads) <= 5 + math_threads()  # math threads already at work may read one tensor each
    assert list(tmp_path.iterdir()) == []


def test_crash_with_overwrite_keeps_previous_output(llama_untied, adapter, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    reads = _crash_on_fifth_read(monkeypatch, llama_untied / "model.safetensors")
    with pytest.raises(KeyboardInterrupt):
        lorafuse.merge(llama_untied, [adapter], out, overwrite=True)
    assert 5 <= len(reads) <= 5 + math_threads()  # math threads already at work may read one tensor each
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_error_mid_write_leaves_no_output(llama_untied, adapter, tmp_path):
    """A tensor late in the file that overflows fp16 fails the merge after earlier tensors were written."""
    from safetensors.torch import save_file

    base = shutil.copytree(llama_untied, tmp_path / "base")
    tensors = read_tensors(base)
    last = list(tensors)[-1]
    tensors[last] = tensors[last].clone()
    tensors[last].view(-1)[0] = 1e6
    save_file(tensors, base / "model.safetensors")
    out = tmp_path / "out" / "merged"
    with pytest.raises(LorafuseError, match=last.replace(".", r"\.")):
        lorafuse.merge(base, [adapter], out, dtype="fp16")
    assert not (tmp_path / "out").exists()  # the parent the merge created is removed with its temporary


def test_cli_json_report(llama_untied, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(llama_untied), str(adapter), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors_touched"] == 14 and report["tensors_total"] == 21
    assert report["output"] == str(out) and report["dry_run"] is False
    assert (out / "model.safetensors").is_file()


def test_adapter_saved_as_bin(llama_untied, adapter, reference, tmp_path):
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy-adapter"
    legacy.mkdir()
    shutil.copy(adapter / "adapter_config.json", legacy / "adapter_config.json")
    torch.save(load_file(adapter / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    out = tmp_path / "merged"
    report = lorafuse.merge(llama_untied, [legacy], out)
    _assert_same_tensors(read_tensors(out), reference)
    digest = hashlib.sha256((legacy / "adapter_model.bin").read_bytes()).hexdigest()
    assert report.adapters[0]["files"] == {"adapter_model.bin": digest}


def test_cli_weights_match_api(llama_untied, adapter, tmp_path, capsys, monkeypatch):
    second = make_peft_adapter(llama_untied, tmp_path / "second", target_modules=["q_proj", "o_proj"], seed=5)
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    args = ["merge", str(llama_untied), str(adapter), str(second), "-o", str(cli_out)]
    assert main([*args, "--weight", "0.5", "--weight", "-1.5"]) == 0
    lorafuse.merge(llama_untied, [adapter, second], api_out, weights=[0.5, -1.5])
    _assert_same_tensors(read_tensors(cli_out), read_tensors(api_out))
    lorafuse.merge(llama_untied, [adapter, second], tmp_path / "plain")
    key = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(read_tensors(cli_out)[key], read_tensors(tmp_path / "plain")[key])


@pytest.mark.parametrize("out_format", ["safetensors", "bin"])
def test_other_weight_copies_in_base_are_not_carried_over(out_format, llama_untied, adapter, reference, tmp_path):
    """A base with both model.safetensors and pytorch_model.bin (and a consolidated.safetensors): only the merged
    weights reach the output, never a stale unmerged copy (with --format bin it would replace the merged file)."""
    base = shutil.copytree(llama_untied, tmp_path / "base")
    torch.save(read_tensors(llama_untied), base / "pytorch_model.bin")
    shutil.copy(base / "model.safetensors", base / "consolidated.safetensors")
    (base / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    out = tmp_path / "merged"
    report = lorafuse.merge(base, [adapter], out, out_format=out_format)
    names = sorted(p.name for p in out.iterdir())
    weights = ["model.safetensors"] if out_format == "safetensors" else ["pytorch_model.bin"]
    assert names == sorted(
        [*weights, "README.md", "config.json", "generation_config.json", "lorafuse_merge.json", "tokenizer.model"]
    )
    assert "pytorch_model.bin" not in report.copied_files and "consolidated.safetensors" not in report.copied_files
    if out_format == "bin":
        _assert_same_tensors(torch.load(out / "pytorch_model.bin", weights_only=True), reference)
    else:
        _assert_same_tensors(read_tensors(out), reference)


@pytest.mark.parametrize("out_format", ["safetensors", "bin"])
def test_dry_run_lists_the_files_a_real_run_writes(out_format, llama_untied, adapter, tmp_path):
    out = tmp_path / "merged"
    planned = lorafuse.merge(llama_untied, [adapter], out, out_format=out_format, max_shard_size="20KB", dry_run=True)
    assert not out.exists()
    written = lorafuse.merge(llama_untied, [adapter], out, out_format=out_format, max_shard_size="20KB")
    assert planned.files == written.files
    assert set(written.files) <= {p.name for p in out.iterdir()}
    assert any(name.endswith(".index.json") for name in written.files)


def test_dtype_leaves_integer_tensors_alone(llama_untied, adapter, tmp_path):
    from safetensors.torch import save_file

    base = shutil.copytree(llama_untied, tmp_path / "base")
    tensors = read_tensors(base)
    tensors["model.position_ids"] = torch.arange(64, dtype=torch.int64) * 1_000_000  # beyond fp16 if converted
    save_file(tensors, base / "model.safetensors")
    out = tmp_path / "merged"
    lorafuse.merge(base, [adapter], out, dtype="fp16")
    merged = read_tensors(out)
    assert merged["model.position_ids"].dtype == torch.int64
    assert torch.equal(merged["model.position_ids"], tensors["model.position_ids"])
    assert merged["model.norm.weight"].dtype == torch.float16
