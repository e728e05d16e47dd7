"""Fixtures for the source tests: git repos served over file://, a hand-built Hugging Face cache, reference merges.

Everything is built from the tiny example in examples/tiny (a bf16 Qwen3-shaped base and a PEFT LoRA adapter);
the reference merges are lorafuse merges of local folders, which tests/test_example.py checks against PEFT, so a
source test only has to show that a remote source yields the same bytes as the local one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from safetensors.torch import load_file, save_file

import lorafuse

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny"
BASE = EXAMPLE / "base"
ADAPTER = EXAMPLE / "adapter"
# Store hand-written pointer text as it is, even where git-lfs is configured globally.
NO_CLEAN = ["-c", "filter.lfs.clean=", "-c", "filter.lfs.process=", "-c", "filter.lfs.required=false"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git for a fixture (failing the test loudly on error); returns stdout."""
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout.strip()


def scaled_adapter(dest: Path, factor: float = 2.0) -> Path:
    """A copy of the example adapter with every lora_B scaled (a different, equally valid adapter)."""
    dest.mkdir(parents=True)
    tensors = load_file(ADAPTER / "adapter_model.safetensors")
    tensors = {k: (v * factor if "lora_B" in k else v) for k, v in tensors.items()}
    save_file(tensors, dest / "adapter_model.safetensors")
    shutil.copy(ADAPTER / "adapter_config.json", dest / "adapter_config.json")
    return dest


def merged_bytes(folder: Path) -> bytes:
    return (Path(folder) / "model.safetensors").read_bytes()


def reference(out: Path, adapter: Path = ADAPTER) -> bytes:
    """The merged weights of a local merge of BASE + ``adapter``."""
    lorafuse.merge(BASE, [adapter], out)
    return merged_bytes(out)


def _commit_tree(work: Path, files: dict[str, Path], message: str) -> str:
    for old in work.iterdir():
        if old.name not in (".git", ".gitattributes"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for rel, src in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, work / rel)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", message, cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def adapter_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {f"{prefix}{p.name}": p for p in sorted(Path(folder).iterdir())}


def make_adapter_repo(root: Path, scaled: Path) -> dict[str, str]:
    """A bare repo (served as file://) with history:

    - main, commit 1 (tag ``v1``): the example adapter at the top level;
    - main, commit 2 (the default branch's head): the ``scaled`` adapter;
    - branch ``nested``: the example adapter in ``out/final/`` and a stray weight file at the top level.

    Returns the URL and the commit hashes.
    """
    bare, work = root / "adapter.git", root / "adapter-work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("init", "-q", "-b", "main", str(work))
    first = _commit_tree(work, adapter_files(ADAPTER), "example adapter")
    git("tag", "v1", cwd=work)
    second = _commit_tree(work, adapter_files(scaled), "scaled adapter")
    git("checkout", "-q", "-b", "nested", first, cwd=work)
    files = adapter_files(ADAPTER, "out/final/")
    files["README.md"] = ADAPTER / "adapter_config.json"
    nested = _commit_tree(work, files, "adapter in a sub-folder")
    git("push", "-q", bare.as_uri(), "main", "nested", "v1", cwd=work)
    return {"url": bare.as_uri(), "v1": first, "main": second, "nested": nested}


def adapter_repos(root: Path) -> dict[str, str]:
    """make_adapter_repo's repository of the tiny adapter and its 2x-scaled copy, with the reference merges of
    both (``ref_orig``, ``ref_scaled``: the bytes each must merge into)."""
    scaled = scaled_adapter(root / "scaled")
    info = make_adapter_repo(root, scaled)
    info["ref_orig"] = reference(root / "ref-orig")
    info["ref_scaled"] = reference(root / "ref-scaled", scaled)
    assert info["ref_orig"] != info["ref_scaled"]
    return info


def lfs_pointer_text(data: bytes) -> str:
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n"


def make_pointer_repo(root: Path) -> str:
    """A bare repo whose adapter weights are a Git LFS pointer to an object the server does not have.

    Built without git-lfs: the pointer file is written by hand, exactly as git-lfs would commit it.
    """
    bare, work = root / "pointer.git", root / "pointer-work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("init", "-q", "-b", "main", str(work))
    (work / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    shutil.copy(ADAPTER / "adapter_config.json", work / "adapter_config.json")
    pointer = lfs_pointer_text((ADAPTER / "adapter_model.safetensors").read_bytes())
    (work / "adapter_model.safetensors").write_text(pointer)
    git(*NO_CLEAN, "add", "-A", cwd=work)
    git("commit", "-q", "-m", "pointer only", cwd=work)
    git("-c", "lfs.allowincompletepush=true", "push", "-q", "--no-verify", bare.as_uri(), "main", cwd=work)
    return bare.as_uri()


def make_lfs_repo(root: Path) -> str:
    """A bare repo whose adapter weights are tracked by Git LFS, objects pushed to the file:// server (git-lfs)."""
    assert shutil.which("git-lfs"), "git-lfs is required for this test: install it (apt-get install git-lfs)"
    bare, work = root / "lfs.git", root / "lfs-work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("init", "-q", "-b", "main", str(work))
    git("lfs", "install", "--local", cwd=work)
    git("lfs", "track", "*.safetensors", cwd=work)
    _commit_tree(work, adapter_files(ADAPTER), "adapter in LFS")
    # A training state below the adapter whose LFS object the server lacks: a merge must not need it.
    (work / "checkpoint-1").mkdir()
    (work / "checkpoint-1" / "optimizer.safetensors").write_text(lfs_pointer_text(b"optimizer state"))
    git(*NO_CLEAN, "add", "-A", cwd=work)
    git("commit", "-q", "-m", "stray checkpoint", cwd=work)
    git("-c", "lfs.allowincompletepush=true", "push", "-q", bare.as_uri(), "main", cwd=work)
    objects = list((bare / "lfs" / "objects").rglob("*"))
    assert any(p.is_file() for p in objects), "git-lfs did not upload the object to the file:// remote"
    return bare.as_uri()


def make_hf_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Lay ``folder`` out as huggingface_hub's cache does: blobs, snapshots/<sha>/ symlinks, refs/<revision>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return sha


def write_config(folder: Path, **changes) -> Path:
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def fake_modelscope(cache_root, calls, with_patterns=True):
    """snapshot_download as ModelScope lays out its cache (<cache_dir>/<org>/<name>), serving the tiny example."""
    served = {"org/tiny-base": BASE, "org/tiny-adapter": ADAPTER}

    def download(model_id, revision=None, cache_dir=None, allow_patterns=None, ignore_patterns=None):
        calls.append({"model_id": model_id, "revision": revision, "cache_dir": cache_dir, "allow": allow_patterns})
        if model_id not in served:
            raise ValueError(f"The model: {model_id} not exists\nmore detail")
        dest = (cache_dir or cache_root) + "/" + model_id
        shutil.copytree(served[model_id], dest, dirs_exist_ok=True)
        return dest

    if with_patterns:
        return download

    def old_download(model_id, revision=None, cache_dir=None):
        return download(model_id, revision=revision, cache_dir=cache_dir)

    return old_download
