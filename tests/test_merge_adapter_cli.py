"""`merge-adapter`: the seed script's flags and environment, end to end (git adapter over file://, local base)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import modelscope
import pytest
import torch
from sources_helpers import ADAPTER, BASE, fake_modelscope, make_adapter_repo, merged_bytes, reference, scaled_adapter

from lorafuse.cli.compat.merge_adapter import DEFAULTS, WORK_MARKER, main

ENV_VARS = [var for var, _ in DEFAULTS.values()] + ["ADAPTER_CONFIG_JSON", "ADAPTER_CONFIG_PATH"]


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(200)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-adapter")
    base = root / "base"
    shutil.copytree(BASE, base)
    _tokenizer(base)
    scaled = scaled_adapter(root / "scaled")
    return {
        "base": base,
        "repo": make_adapter_repo(root, scaled),
        "orig": reference(root / "orig"),
        "scaled": reference(root / "scaled-ref", scaled),
    }


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def _lines(capsys):
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines and all(line.startswith("[merge_adapter] ") for line in lines), out
    return lines


def test_env_only(setup, clean_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BASE_MODEL", str(setup["base"]))
    monkeypatch.setenv("ADAPTER_REPO_URL", setup["repo"]["url"])
    monkeypatch.setenv("ADAPTER_REPO_REF", "v1")
    monkeypatch.setenv("MERGE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("MERGED_MODEL_DIR", str(tmp_path / "merged"))
    assert main([]) == 0
    lines = _lines(capsys)
    assert any(f"cloned {setup['repo']['url']} at v1 ({setup['repo']['v1']})" in line for line in lines)
    out = tmp_path / "merged"
    assert merged_bytes(out) == setup["orig"]
    assert (tmp_path / "work" / "adapter_repo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "work" / WORK_MARKER).is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # base dtype kept
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[4, 5, 6]]
    assert model(ids).logits.shape == (1, 3, 256)


def test_flags_only_and_rerun_into_the_same_output(setup, clean_env, tmp_path, capsys):
    flags = ["--base_model", str(setup["base"]), "--adapter_repo_url", setup["repo"]["url"]]
    flags += ["--work_dir", "w", "--output_dir", "out"]
    assert main([*flags, "--adapter_ref", "v1"]) == 0
    assert merged_bytes(tmp_path / "out") == setup["orig"]
    assert main(flags) == 0  # default branch head: the scaled adapter; same output and work folders
    assert merged_bytes(tmp_path / "out") == setup["scaled"]
    _lines(capsys)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["model.safetensors", "config.json", "generation_config.json", "lorafuse_merge.json", "README.md"]
        + ["tokenizer.json", "tokenizer_config.json"]
    )


def test_defaults_use_modelscope_master_and_relative_folders(setup, clean_env, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(modelscope, "snapshot_download", fake_modelscope(str(tmp_path / "unused"), calls))
    monkeypatch.setenv("BASE_MODEL", "org/tiny-base")
    monkeypatch.setenv("ADAPTER_REPO_URL", setup["repo"]["url"])
    assert main(["--adapter_ref", "v1"]) == 0
    assert calls[0]["model_id"] == "org/tiny-base"
    assert (calls[0]["revision"], calls[0]["cache_dir"]) == ("master", "./model")  # BASE_REVISION, MODEL_CACHE_DIR
    assert merged_bytes(tmp_path / "merged") == setup["orig"]  # ./merged
    assert (tmp_path / "merge_work" / "adapter_repo").is_dir()  # ./merge_work
    assert DEFAULTS["base_model"][1] == "Qwen/Qwen3-4B"


def test_foreign_output_and_work_dirs_are_refused_without_overwrite(setup, clean_env, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    flags = ["--base_model", str(setup["base"]), "--adapter_repo_url", setup["repo"]["url"], "--output_dir", "out"]
    assert main(flags) == 1
    assert "FAILED: output_dir out is not empty and was not made by lorafuse" in capsys.readouterr().out
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "mine.txt").write_text("keep")
    assert main([*flags[:4], "--work_dir", "w", "--output_dir", "new"]) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[merge_adapter] FAILED: work_dir w is not empty") and "--overwrite" in line
    assert (tmp_path / "w" / "mine.txt").is_file() and not (tmp_path / "new").exists()

    assert main([*flags, "--work_dir", "w", "--overwrite"]) == 0
    assert merged_bytes(tmp_path / "out") == setup["scaled"]
    assert not (tmp_path / "out" / "mine.txt").exists() and not (tmp_path / "w" / "mine.txt").exists()


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--adapter_ref", "no-such-tag"], "no branch, tag or commit 'no-such-tag'"),
        (["--adapter_repo_url", ""], "no adapter given: set ADAPTER_REPO_URL"),
        (["--base_model", "/no/such/base"], "base model /no/such/base does not exist"),
        (["--dtype", "int3"], "int3"),
    ],
)
def test_failures_print_one_failed_line_and_exit_1(setup, clean_env, tmp_path, capsys, flags, reason):
    base = ["--base_model", str(setup["base"]), "--adapter_repo_url", setup["repo"]["url"]]
    assert main([*base, *flags]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith("[merge_adapter] FAILED: ") and reason in failed[0]
    assert not (tmp_path / "merged").exists()


def test_adapter_config_from_env_for_a_repo_without_one(setup, clean_env, tmp_path, monkeypatch, capsys):
    from sources_helpers import git

    bare, work = tmp_path / "noconfig.git", tmp_path / "noconfig"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("init", "-q", "-b", "main", str(work))
    shutil.copy(ADAPTER / "adapter_model.safetensors", work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "weights only", cwd=work)
    git("push", "-q", bare.as_uri(), "main", cwd=work)
    monkeypatch.setenv("ADAPTER_CONFIG_JSON", (ADAPTER / "adapter_config.json").read_text())
    assert main(["--base_model", str(setup["base"]), "--adapter_repo_url", bare.as_uri()]) == 0
    assert merged_bytes(tmp_path / "merged") == setup["orig"]
    assert not (tmp_path / "merge_work" / "adapter_repo" / "adapter_config.json").exists()  # clone left as is
    assert (tmp_path / "merge_work" / "adapter" / "adapter_config.json").is_file()


def test_console_script_process_with_env_only(setup, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(BASE_MODEL=str(setup["base"]), ADAPTER_REPO_URL=setup["repo"]["url"], ADAPTER_REPO_REF="v1")
    code = "import sys; from lorafuse.cli.compat import merge_adapter_main; sys.exit(merge_adapter_main())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("[merge_adapter] done")
    assert merged_bytes(tmp_path / "merged") == setup["orig"]
