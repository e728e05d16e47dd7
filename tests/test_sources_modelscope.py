"""ModelScope sources through modelscope's real module, with only its network call (snapshot_download) replaced."""

from __future__ import annotations

import sys

import modelscope
import pytest
from sources_helpers import fake_modelscope, merged_bytes, reference

import lorafuse
from lorafuse.errors import SourceError
from lorafuse.sources import resolve_model


def test_ms_sources_call_snapshot_download_with_id_cache_and_revision(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(modelscope, "snapshot_download", fake_modelscope(str(tmp_path / "default"), calls))
    report = lorafuse.merge(
        "ms://org/tiny-base@v1.0", ["ms://org/tiny-adapter"], tmp_path / "out", cache_dir=tmp_path / "model"
    )
    assert merged_bytes(tmp_path / "out") == reference(tmp_path / "ref")
    assert [(c["model_id"], c["revision"], c["cache_dir"]) for c in calls] == [
        ("org/tiny-adapter", None, str(tmp_path / "model")),
        ("org/tiny-base", "v1.0", str(tmp_path / "model")),
    ]
    assert "*.safetensors" in calls[1]["allow"] and "*.bin" not in calls[1]["allow"]
    assert report.sources["base"] == {
        "source": "ms://org/tiny-base@v1.0",
        "kind": "ms",
        "revision": "v1.0",
        "path": str(tmp_path / "model" / "org" / "tiny-base"),
    }


def test_bare_id_is_modelscope_when_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(modelscope, "snapshot_download", fake_modelscope(str(tmp_path / "ms"), calls))
    monkeypatch.chdir(tmp_path)
    path = resolve_model("org/tiny-base", revision="master", default_hub="ms")
    assert path == tmp_path / "ms" / "org" / "tiny-base"
    assert calls[0]["revision"] == "master" and calls[0]["cache_dir"] is None


def test_modelscope_without_pattern_filters_downloads_everything(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(modelscope, "snapshot_download", fake_modelscope(str(tmp_path), calls, with_patterns=False))
    assert resolve_model("ms://org/tiny-base") == tmp_path / "org" / "tiny-base"
    assert calls[0]["allow"] is None


def test_modelscope_errors_become_source_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(modelscope, "snapshot_download", fake_modelscope(str(tmp_path), []))
    with pytest.raises(SourceError, match=r"cannot get ms://org/absent@master from ModelScope \(ValueError: The model"):
        resolve_model("ms://org/absent@master")


def test_missing_modelscope_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(SourceError, match=r"pip install 'lorafuse\[modelscope\]'"):
        resolve_model("ms://org/tiny-base")
