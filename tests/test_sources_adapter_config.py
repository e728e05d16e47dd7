"""adapter_config.json from --adapter-config / ADAPTER_CONFIG_JSON / ADAPTER_CONFIG_PATH, and the base it names."""

from __future__ import annotations

import json
import shutil

import pytest
from sources_helpers import ADAPTER, BASE, merged_bytes, reference, scaled_adapter, write_config

import lorafuse
from lorafuse.errors import InputError, SourceError
from lorafuse.sources import resolve_adapter


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    return {"orig": reference(root / "orig")}


@pytest.fixture
def bare_weights(tmp_path, monkeypatch):
    """The example adapter's weights without their adapter_config.json (read-only, as a user's folder may be)."""
    monkeypatch.delenv("ADAPTER_CONFIG_JSON", raising=False)
    monkeypatch.delenv("ADAPTER_CONFIG_PATH", raising=False)
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(ADAPTER / "adapter_model.safetensors", folder)
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def _config_text(**changes) -> str:
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    config.update(changes)
    return json.dumps(config)


def test_config_from_flag_file(bare_weights, tmp_path, refs):
    config = tmp_path / "config.json"
    config.write_text(_config_text())
    report = lorafuse.merge(BASE, [bare_weights], tmp_path / "out", adapter_config=config)
    assert merged_bytes(tmp_path / "out") == refs["orig"]
    assert sorted(p.name for p in bare_weights.iterdir()) == ["adapter_model.safetensors"]  # never written to
    assert report.sources["adapters"][0]["adapter_config"] == str(config)


def test_config_from_env_json_then_env_path(bare_weights, tmp_path, monkeypatch, refs):
    path = tmp_path / "from-path.json"
    path.write_text(_config_text(lora_alpha=32))  # twice the scale: a different result
    monkeypatch.setenv("ADAPTER_CONFIG_PATH", str(path))
    monkeypatch.setenv("ADAPTER_CONFIG_JSON", _config_text())
    lorafuse.merge(BASE, [bare_weights], tmp_path / "json")
    assert merged_bytes(tmp_path / "json") == refs["orig"]  # ADAPTER_CONFIG_JSON wins
    monkeypatch.delenv("ADAPTER_CONFIG_JSON")
    lorafuse.merge(BASE, [bare_weights], tmp_path / "path")
    assert merged_bytes(tmp_path / "path") == reference(tmp_path / "ref2", scaled_adapter(tmp_path / "scaled"))


def test_flag_wins_over_env(bare_weights, tmp_path, monkeypatch, refs):
    monkeypatch.setenv("ADAPTER_CONFIG_JSON", _config_text(lora_alpha=32))
    config = tmp_path / "config.json"
    config.write_text(_config_text())
    lorafuse.merge(BASE, [bare_weights], tmp_path / "out", adapter_config=config)
    assert merged_bytes(tmp_path / "out") == refs["orig"]


def test_existing_config_is_kept_even_with_env(tmp_path, monkeypatch, refs):
    monkeypatch.setenv("ADAPTER_CONFIG_JSON", _config_text(lora_alpha=32))
    lorafuse.merge(BASE, [ADAPTER], tmp_path / "out")
    assert merged_bytes(tmp_path / "out") == refs["orig"]


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({}, "weights-only has no adapter_config.json: pass --adapter-config FILE or set ADAPTER_CONFIG_JSON"),
        ({"ADAPTER_CONFIG_JSON": "{not json"}, "environment variable ADAPTER_CONFIG_JSON is not valid JSON"),
        ({"ADAPTER_CONFIG_JSON": "[1, 2]"}, "ADAPTER_CONFIG_JSON must hold a JSON object"),
        ({"ADAPTER_CONFIG_PATH": "/nonexistent/c.json"}, "ADAPTER_CONFIG_PATH= /nonexistent/c.json cannot be read"),
    ],
)
def test_config_errors(bare_weights, tmp_path, monkeypatch, env, match):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises((SourceError, InputError), match=match):
        lorafuse.merge(BASE, [bare_weights], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_given_but_no_weights_lists_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "empty-adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    monkeypatch.setenv("ADAPTER_CONFIG_JSON", _config_text())
    with pytest.raises(InputError, match=r"has no adapter weights .* it holds: notes.txt"):
        resolve_adapter(folder, work_dir=tmp_path / "w")


def test_bin_weights_are_found_in_order(tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-adapter"
    folder.mkdir()
    tensors = load_file(ADAPTER / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    torch.save({k: v * 0 for k, v in tensors.items()}, folder / "pytorch_model.bin")  # lower priority
    write_config(folder)
    lorafuse.merge(BASE, [folder], tmp_path / "out")
    assert merged_bytes(tmp_path / "out") == reference(tmp_path / "ref")


def test_base_from_adapter_config_with_revision(tmp_path, refs):
    folder = tmp_path / "adapter"
    shutil.copytree(ADAPTER, folder)
    write_config(folder, base_model_name_or_path=str(BASE))
    report = lorafuse.merge(None, [folder], tmp_path / "out")
    assert merged_bytes(tmp_path / "out") == refs["orig"]
    assert report.sources["base"]["chosen_from_adapter"] == str(folder)
    write_config(folder, base_model_name_or_path="hf://org/nothing-here", revision="abc")
    with pytest.raises(SourceError, match=r"hf://org/nothing-here@abc"):
        lorafuse.merge(None, [folder], tmp_path / "out2")


@pytest.mark.parametrize("changes", [{"base_model_name_or_path": None}, {"base_model_name_or_path": ""}])
def test_no_base_anywhere_is_an_error(tmp_path, changes):
    folder = tmp_path / "adapter"
    shutil.copytree(ADAPTER, folder)
    write_config(folder, **changes)
    with pytest.raises(SourceError, match="no BASE given and .* has no base_model_name_or_path: pass the base"):
        lorafuse.merge(None, [folder], tmp_path / "out")


def test_base_named_by_config_that_does_not_exist(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(ADAPTER, folder)
    write_config(folder, base_model_name_or_path="/trainer/only/base")
    with pytest.raises(InputError, match="base model /trainer/only/base does not exist"):
        lorafuse.merge(None, [folder], tmp_path / "out")


def test_no_base_for_a_single_file_adapter_says_pass_it(tmp_path):
    weights = ADAPTER / "adapter_model.safetensors"
    with pytest.raises(SourceError, match=r"adapter .*adapter_model.safetensors has no adapter_config.json to name"):
        lorafuse.merge(None, [weights], tmp_path / "out")
