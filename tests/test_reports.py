"""What the commands print for a person: one size format saying tensor bytes or file bytes, "changes nothing" for
an untrained adapter, no "worst tensors" list on a passing verify unless one is beyond correct rounding, the
--dry-run plan as a short table, and merge-adapter's help about its ModelScope default.

Expected numbers come from the files themselves (safetensors headers, the adapters' own keys, file sizes), not from
lorafuse's report.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_peft_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorafuse.cli import main
from lorafuse.report import format_bytes

ITEM_BYTES = {"F32": 4, "BF16": 2, "F16": 2}


@pytest.fixture(scope="module")
def adapters(llama_untied, tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    trained = make_peft_adapter(llama_untied, root / "trained", target_modules=["q_proj", "up_proj"])
    untrained = make_peft_adapter(  # PEFT's own initialization: lora_B all zero
        llama_untied, root / "untrained", target_modules=["v_proj"], init_lora_weights=True, randomize=False
    )
    return trained, untrained


def _header(path):
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + size])
    header.pop("__metadata__", None)
    return header


def _targets(adapter) -> set[str]:
    """The base weights an adapter's lora_A tensors update, from its own file."""
    names = safe_open(adapter / "adapter_model.safetensors", "np").keys()
    return {n.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight") for n in names if ".lora_A." in n}


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (181_000, "181.0 KB"), (999_960, "1.0 MB"), (1.5e9, "1.5 GB")],
)
def test_one_size_format(n, text):
    assert format_bytes(n) == text


def test_an_untrained_adapter_changes_nothing(llama_untied, adapters, tmp_path, capsys):
    trained, untrained = adapters
    assert main(["merge", str(llama_untied), str(untrained), "-o", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "change nothing (every lora_B is all zero), so the merged model is the base" in out
    assert "tensors changed" not in out
    assert main(["merge", str(llama_untied), str(trained), str(untrained), "-o", str(tmp_path / "two")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'two'}: {len(_targets(trained))} of ")
    assert lines[1] == f"  {untrained} changes nothing (every lora_B is all zero)"


def test_dry_run_prints_the_plan_as_a_table(llama_untied, adapters, tmp_path, capsys):
    trained, _ = adapters
    base = shutil.copytree(llama_untied, tmp_path / "base")
    (base / "tokenizer.json").write_text("{}")
    out = tmp_path / "merged"
    assert main(["merge", str(base), str(trained), "-o", str(out), "--dry-run", "--max-shard-size", "100KB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = {}
    for shard in sorted(base.glob("*.safetensors")):
        header.update(_header(shard))
    targets = _targets(trained)
    touched_bytes = sum(ITEM_BYTES[header[t]["dtype"]] * int(np.prod(header[t]["shape"])) for t in targets)
    total = sum(ITEM_BYTES[v["dtype"]] * int(np.prod(v["shape"])) for v in header.values())
    assert lines[0].startswith(f"would write {out}: {len(targets)} of {len(header)} tensors changed by 1 adapter(s)")
    assert f"{format_bytes(total)} tensor bytes in " in lines[0]
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["adapter", "kind", "tensors", "tensor", "bytes"]
    assert table[1].split() == [str(trained), "lora", str(len(targets)), *format_bytes(touched_bytes).split()]
    files = next(line for line in lines if line.startswith("files "))
    assert "model-00001-of-" in files and "model.safetensors.index.json" in files  # 100KB shards
    copied = next(line for line in lines if line.startswith("copied "))
    assert {"config.json,", "tokenizer.json"} <= set(copied.split()) and "README.md" not in copied
    assert not out.exists()


def test_a_passing_verify_lists_no_worst_tensors(llama_untied, adapters, tmp_path, capsys):
    trained, _ = adapters
    out = tmp_path / "merged"
    assert main(["merge", str(llama_untied), str(trained), "-o", str(out), "--dtype", "bf16", "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--no-output-check"]) == 0
    text = capsys.readouterr().out
    assert "every changed tensor is correctly rounded (within 0.5 ulp)" in text
    assert "worst" not in text and "beyond" not in text


def test_a_verify_within_tolerance_but_beyond_rounding_lists_those(llama_untied, adapters, tmp_path, capsys):
    """One bf16 value moved two steps (1.5 to 2.5 ulp off): allowed with --max-ulp 3, and that tensor is named."""
    trained, _ = adapters
    out = tmp_path / "merged"
    assert main(["merge", str(llama_untied), str(trained), "-o", str(out), "--dtype", "bf16", "-q"]) == 0
    key = next(iter(sorted(_targets(trained))))
    state = load_file(out / "model.safetensors")
    bits = state[key].view(dtype=torch.int16)
    bits.view(-1)[0] += 2  # two bf16 numbers up
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(out), "--no-output-check", "--max-ulp", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("tensors beyond correct rounding (0.5 ulp), worst first:")
    assert lines[start + 1].startswith(f"  {key}: ")
    assert main(["verify", str(out), "--no-output-check"]) == 1  # the default tolerance, 1 ulp: fails
    assert any(line.startswith(f"FAIL {key}") for line in capsys.readouterr().out.splitlines())


def test_inspect_says_its_sizes_are_file_bytes(llama_untied, capsys):
    assert main(["inspect", str(llama_untied)]) == 0
    size = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("size "))
    on_disk = (llama_untied / "model.safetensors").stat().st_size
    assert size.split()[1:4] == [*format_bytes(on_disk).split(), "file"]


def test_merge_adapter_help_says_which_hub_a_bare_id_is():
    text = subprocess.run(
        [sys.executable, "-c", "from lorafuse.cli.compat import merge_adapter_main; merge_adapter_main(['--help'])"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": ""},
    ).stdout
    flat = " ".join(text.split())
    assert "a bare ORG/NAME is a ModelScope id" in flat and "Hugging Face Hub id" in flat
    assert "--base_model defaults to Qwen/Qwen3-4B" in flat
