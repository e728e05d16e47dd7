"""Hostile links in model and adapter folders (issue 15, items 3, 10 and 11).

A base or adapter folder (or a git repository, whose clone recreates its links) with ``tokenizer.json`` linking to a
private file, or a sub-folder linking out of the folder, must never put the private bytes into an output people
publish: such links are refused with one line naming them. Links inside the folder are copied as the files they
point to, a Hugging Face cache snapshot (every file a link to ``../../blobs/HASH``) still merges, a symlink loop or
a broken link is one line naming it, and weight files in sub-folders (``original/consolidated.safetensors``) stay
out of the merged output with a warning naming them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hostile import Result, assert_no_litter, assert_refused, run_command, snapshot
from sources_helpers import ADAPTER, BASE, git, make_hf_cache

from lorafuse.errors import InputError
from lorafuse.io.extra_files import copy_extra_files, copy_tokenizer
from lorafuse.io.model_files import find_model_weights, link_roots

SECRET = b"PRIVATE-KEY-7f3a9c-do-not-publish"


class Scene:
    """A private folder outside every input, copies of the tiny base and adapter, and a run folder for outputs."""

    def __init__(self, root: Path):
        self.root = root
        self.private = root / "private"
        (self.private / "dir").mkdir(parents=True)
        (self.private / "secret.txt").write_bytes(SECRET)
        (self.private / "dir" / "key.json").write_bytes(b'{"key": "' + SECRET + b'"}')
        self.base = Path(shutil.copytree(BASE, root / "base"))
        self.adapter = Path(shutil.copytree(ADAPTER, root / "adapter"))
        self.run = root / "run"
        self.tmp = root / "tmp"  # TMPDIR of the commands: clones and work folders go there
        self.run.mkdir()
        self.tmp.mkdir()
        self.out = self.run / "out"
        self.before: dict | None = None
        self.allowed: set[str] = set()  # what the commands run may leave in the run folder

    def freeze(self) -> None:
        """Record the inputs as they are now (call after planting the links)."""
        self.before = snapshot(self.base, self.adapter, self.private)

    def merge(self, *args, prefill: bool = True, base: str | Path | None = None) -> Result:
        env = {"TMPDIR": str(self.tmp), **({} if prefill else {"LORAFUSE_PREFILL": "0"})}
        return run_command(
            "lorafuse", "merge", base or self.base, self.adapter, "-o", self.out, *args, cwd=self.run, env=env
        )

    def merge_adapter(self, base: str | Path | None = None, adapter: str | Path | None = None) -> Result:
        flags = ["--base_model", base or self.base, "--adapter_repo_url", adapter or self.adapter]
        flags += ["--work_dir", self.run / "work", "--output_dir", self.out, "--cache_dir", self.run / "cache"]
        self.allowed.add("work")  # merge-adapter prepares its --work_dir before merging (its documented contract)
        result = run_command("merge-adapter", *flags, cwd=self.run, env={"TMPDIR": str(self.tmp)})
        # merge-adapter reports on stdout ("[merge_adapter] FAILED: ..."), as the script it replaces did.
        return Result(result.code, "", result.out + result.err)

    def assert_unchanged(self) -> None:
        assert self.before is not None, "call freeze() before running the command"
        assert snapshot(self.base, self.adapter, self.private) == self.before, "an input changed"

    def assert_refused_cleanly(self, result: Result, *needles: str) -> str:
        line = assert_refused(result, *needles)
        self.assert_unchanged()
        assert_no_litter(self.run, self.allowed)
        assert_no_litter(self.tmp)
        return line


def assert_nothing_private(output: Path) -> None:
    """No link anywhere in ``output`` and the private bytes in none of its files."""
    paths = [output, *output.rglob("*")] if output.is_dir() else [output]
    for path in paths:
        assert not path.is_symlink(), f"{path} is a link in the output"
        if path.is_file():
            assert SECRET not in path.read_bytes(), f"{path} holds the private file's content"


@pytest.fixture
def scene(tmp_path) -> Scene:
    return Scene(tmp_path)


COMMANDS = ["merge", "merge-no-prefill", "merge-adapter"]


def run_merge(scene: Scene, command: str, base: str | Path | None = None) -> Result:
    """One of the commands that copy the base's files into the merged output."""
    if command == "merge-adapter":
        return scene.merge_adapter(base)
    return scene.merge(prefill=command == "merge", base=base)


# --- links out of the folder: refused ------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_tokenizer_linking_to_a_private_file_is_refused(scene, command):
    (scene.base / "tokenizer.json").symlink_to(scene.private / "secret.txt")
    scene.freeze()
    line = scene.assert_refused_cleanly(run_merge(scene, command), "tokenizer.json", str(scene.private / "secret.txt"))
    assert "outside the model folder" in line
    assert not scene.out.exists()


def test_relative_link_climbing_out_of_the_folder_is_refused(scene):
    (scene.base / "chat_template.jinja").symlink_to(Path("..") / "private" / "secret.txt")
    scene.freeze()
    scene.assert_refused_cleanly(scene.merge(), "chat_template.jinja", "outside the model folder")


def test_sub_folder_linking_out_of_the_folder_is_refused(scene):
    (scene.base / "extra").symlink_to(scene.private / "dir", target_is_directory=True)
    scene.freeze()
    scene.assert_refused_cleanly(scene.merge(), "extra", str(scene.private / "dir"))


def test_link_out_of_a_real_sub_folder_is_refused(scene):
    (scene.base / "1_Pooling").mkdir()
    (scene.base / "1_Pooling" / "config.json").symlink_to(scene.private / "dir" / "key.json")
    scene.freeze()
    scene.assert_refused_cleanly(scene.merge(), "1_Pooling/config.json", "outside the model folder")


@pytest.mark.parametrize("command", ["merge", "lora-merger"])
def test_weight_file_linking_out_of_the_folder_is_refused(scene, command):
    """The base's tensors are copied into the output: a weights link out of the folder is refused like any other."""
    shutil.move(scene.base / "model.safetensors", scene.private / "model.safetensors")
    (scene.base / "model.safetensors").symlink_to(scene.private / "model.safetensors")
    scene.freeze()
    if command == "lora-merger":
        args = ["--source-model", scene.base, "--lora-model", scene.adapter, "--output", scene.run / "m.safetensors"]
        result = run_command("lora-merger", *args, cwd=scene.run)
    else:
        result = scene.merge()
    scene.assert_refused_cleanly(result, "model.safetensors", str(scene.private / "model.safetensors"))


def test_index_entry_linking_out_of_the_folder_is_refused(scene):
    shutil.move(scene.base / "model.safetensors", scene.private / "model.safetensors")
    (scene.base / "model-00001-of-00001.safetensors").symlink_to(scene.private / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}
    (scene.base / "model.safetensors.index.json").write_text(json.dumps(index))
    scene.freeze()
    line = scene.assert_refused_cleanly(scene.merge(), "model.safetensors.index.json", "model.norm.weight")
    assert "outside the model folder" in line


@pytest.fixture(scope="module")
def hostile_base_repo(tmp_path_factory):
    """A bare git repo of the tiny base whose tokenizer.json and sub-folder link to a private file and folder."""
    root = tmp_path_factory.mktemp("links-git")
    private = root / "private"
    (private / "dir").mkdir(parents=True)
    (private / "secret.txt").write_bytes(SECRET)
    (private / "dir" / "key.json").write_bytes(SECRET)
    bare, work = root / "base.git", root / "base-work"
    # "master": merge-adapter's default base revision (ModelScope's default branch)
    git("init", "-q", "--bare", "-b", "master", str(bare))
    shutil.copytree(BASE, work)
    (work / "tokenizer.json").symlink_to(private / "secret.txt")
    git("init", "-q", "-b", "master", str(work))
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "base with a link to a private file", cwd=work)
    git("push", "-q", bare.as_uri(), "master", cwd=work)
    # An adapter repo whose sub-folder links to someone's private adapter.
    shutil.copytree(ADAPTER, private / "adapter")
    adapter_bare, adapter_work = root / "adapter.git", root / "adapter-work"
    git("init", "-q", "--bare", "-b", "main", str(adapter_bare))
    adapter_work.mkdir()
    (adapter_work / "README.md").write_text("# adapters\n")
    (adapter_work / "lora").symlink_to(private / "adapter", target_is_directory=True)
    git("init", "-q", "-b", "main", str(adapter_work))
    git("add", "-A", cwd=adapter_work)
    git("commit", "-q", "-m", "a sub-folder linking to a private adapter", cwd=adapter_work)
    git("push", "-q", adapter_bare.as_uri(), "main", cwd=adapter_work)
    return {"url": bare.as_uri(), "adapter_url": adapter_bare.as_uri(), "private": private, "root": root}


@pytest.mark.parametrize("command", ["merge-no-prefill", "merge-adapter"])
def test_git_clone_recreating_a_link_out_of_the_repo_is_refused(scene, hostile_base_repo, command):
    before = snapshot(hostile_base_repo["root"])
    scene.freeze()
    result = run_merge(scene, command, base=hostile_base_repo["url"])
    line = scene.assert_refused_cleanly(result, "tokenizer.json", str(hostile_base_repo["private"] / "secret.txt"))
    assert "outside the model folder" in line
    assert snapshot(hostile_base_repo["root"]) == before


def test_adapter_sub_folder_linking_out_of_a_cloned_repo_is_refused(scene, hostile_base_repo):
    before = snapshot(hostile_base_repo["root"])
    scene.freeze()
    args = ["merge", scene.base, hostile_base_repo["adapter_url"], "--adapter-subfolder", "lora", "-o", scene.out]
    result = run_command("lorafuse", *args, cwd=scene.run, env={"TMPDIR": str(scene.tmp)})
    line = scene.assert_refused_cleanly(result, "lora", str(hostile_base_repo["private"] / "adapter"))
    assert "outside" in line
    assert snapshot(hostile_base_repo["root"]) == before


# --- commands that copy no file from their inputs: no private byte in their outputs ------------------------------


def test_lora_merger_copies_nothing_from_the_base_folder(scene):
    (scene.base / "tokenizer.json").symlink_to(scene.private / "secret.txt")
    scene.freeze()
    out = scene.run / "merged.safetensors"
    args = ["--source-model", scene.base, "--lora-model", scene.adapter, "--output", out, "--output-dtype", "bf16"]
    result = run_command("lora-merger", *args, cwd=scene.run)
    assert result.code == 0, result.err
    assert_nothing_private(out)
    scene.assert_unchanged()
    assert_no_litter(scene.run, {"merged.safetensors"})


def test_extract_and_combine_copy_nothing_from_their_inputs(scene):
    (scene.base / "tokenizer.json").symlink_to(scene.private / "secret.txt")
    (scene.adapter / "tokenizer.json").symlink_to(scene.private / "secret.txt")
    (scene.adapter / "extra").symlink_to(scene.private / "dir", target_is_directory=True)
    scene.freeze()
    merged = scene.root / "tuned"
    assert run_command("lorafuse", "merge", BASE, ADAPTER, "-o", merged).code == 0
    result = run_command("lorafuse", "extract", scene.base, merged, "-o", scene.run / "extracted", "--rank", "4")
    assert result.code == 0, result.err
    result = run_command("lorafuse", "combine", scene.adapter, scene.adapter, "-o", scene.run / "combined")
    assert result.code == 0, result.err
    assert_nothing_private(scene.run)
    scene.assert_unchanged()
    assert_no_litter(scene.run, {"extracted", "combined"})


# --- links inside the folder: copied as files ------------------------------------------------------------------


def test_links_inside_the_folder_are_copied_as_the_files_they_point_to(scene):
    (scene.base / "tokenizers").mkdir()
    (scene.base / "tokenizers" / "v2.json").write_text('{"version": "2"}')
    (scene.base / "tokenizer.json").symlink_to(Path("tokenizers") / "v2.json")
    (scene.base / "tok").symlink_to("tokenizers", target_is_directory=True)
    scene.freeze()
    result = scene.merge()
    assert result.code == 0, result.err
    assert (scene.out / "tokenizer.json").read_text() == '{"version": "2"}'
    assert (scene.out / "tok" / "v2.json").read_text() == '{"version": "2"}'
    assert_nothing_private(scene.out)
    scene.assert_unchanged()
    assert_no_litter(scene.run, {"out"})


# --- loops and broken links -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["merge", "merge-no-prefill"])
def test_symlink_loop_is_one_line_naming_it(scene, command):
    (scene.base / "vocab.txt").symlink_to("merges.txt")
    (scene.base / "merges.txt").symlink_to("vocab.txt")
    scene.freeze()
    line = scene.assert_refused_cleanly(run_merge(scene, command), "symlink loop")
    assert "merges.txt" in line or "vocab.txt" in line


def test_folder_linking_to_its_own_parent_is_a_loop(scene):
    (scene.base / "nested").mkdir()
    (scene.base / "nested" / "up").symlink_to("..", target_is_directory=True)
    scene.freeze()
    scene.assert_refused_cleanly(scene.merge(), "nested/up", "symlink loop")


def test_broken_tokenizer_link_is_one_line_naming_it(scene):
    (scene.base / "tokenizer.model").symlink_to("../gone/tokenizer.model")
    scene.freeze()
    scene.assert_refused_cleanly(scene.merge(), "tokenizer.model", "broken link", "../gone/tokenizer.model")


def test_broken_weight_link_is_one_line_naming_it(scene):
    (scene.base / "model.safetensors").unlink()
    (scene.base / "model.safetensors").symlink_to("blobs/missing")
    scene.freeze()
    scene.assert_refused_cleanly(scene.merge(), "model.safetensors", "broken link")


# --- Hugging Face cache snapshots: links into the repository's blobs/ ----------------------------------------------


def _snapshot_of(scene: Scene, extras: dict[str, bytes] | None = None) -> tuple[Path, Path]:
    """The tiny base (plus ``extras``) laid out as huggingface_hub's cache; returns (cache, snapshot folder)."""
    source = scene.root / "hub-source"
    shutil.copytree(BASE, source)
    for name, data in (extras or {}).items():
        (source / name).write_bytes(data)
    cache = scene.root / "hub-cache"
    sha = make_hf_cache(cache, "org/tiny-base", source)
    return cache, cache / "models--org--tiny-base" / "snapshots" / sha


def test_hf_cache_snapshot_merges_by_its_path_and_by_repo_id(scene):
    cache, folder = _snapshot_of(scene, {"tokenizer.json": b'{"hub": true}'})
    assert all(p.is_symlink() for p in folder.iterdir())
    assert link_roots(folder) == (folder.resolve(), (cache / "models--org--tiny-base" / "blobs").resolve())
    before = snapshot(cache)
    scene.freeze()
    result = scene.merge(base=folder)
    assert result.code == 0, result.err
    assert (scene.out / "tokenizer.json").read_bytes() == b'{"hub": true}'
    assert_nothing_private(scene.out)
    shutil.rmtree(scene.out)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TMPDIR": str(scene.tmp)}
    result = run_command("lorafuse", "merge", "hf://org/tiny-base", scene.adapter, "-o", scene.out, env=env)
    assert result.code == 0, result.err
    assert (scene.out / "tokenizer.json").read_bytes() == b'{"hub": true}'
    assert_nothing_private(scene.out)
    assert snapshot(cache) == before
    scene.assert_unchanged()
    assert_no_litter(scene.run, {"out"})


def test_hf_cache_snapshot_link_leaving_the_repository_is_refused(scene):
    cache, folder = _snapshot_of(scene)
    (folder / "tokenizer.json").symlink_to(os.path.relpath(scene.private / "secret.txt", folder))
    scene.freeze()
    scene.assert_refused_cleanly(scene.merge(base=folder), "tokenizer.json", "outside the model folder")


# --- weight files in sub-folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_weight_files_in_sub_folders_stay_out_of_the_output(scene, command):
    (scene.base / "original").mkdir()
    shutil.copy(scene.base / "model.safetensors", scene.base / "original" / "consolidated.safetensors")
    (scene.base / "original" / "params.json").write_text('{"dim": 64}')
    (scene.base / "checkpoint-10").mkdir()
    (scene.base / "checkpoint-10" / "optimizer.pt").write_bytes(b"optimizer state")
    scene.freeze()
    result = run_merge(scene, command)
    assert result.code == 0, result.out + result.err
    assert (scene.out / "original" / "params.json").read_text() == '{"dim": 64}'
    assert not (scene.out / "original" / "consolidated.safetensors").exists()
    assert not (scene.out / "checkpoint-10").exists()
    warning = [line for line in (result.out + result.err).splitlines() if "not copied into the output" in line]
    assert len(warning) == 1 and "original/consolidated.safetensors" in warning[0], result.out + result.err
    assert "checkpoint-10/optimizer.pt" in warning[0]
    record = json.loads((scene.out / "lorafuse_merge.json").read_text())
    assert [w for w in record["warnings"] if "original/consolidated.safetensors" in w]
    scene.assert_unchanged()
    assert_no_litter(scene.run, {"out"} | scene.allowed)


# --- the same rules at the API level (no output path involved) ----------------------------------------------------


def test_copy_extra_files_checks_every_link_before_copying_one(scene):
    (scene.base / "a_first.json").write_text("{}")
    (scene.base / "z_last.json").symlink_to(scene.private / "secret.txt")
    dest = scene.root / "dest"
    dest.mkdir()
    with pytest.raises(InputError, match="z_last.json links to .*outside the model folder"):
        copy_extra_files(scene.base, dest, [scene.base / "model.safetensors"], set())
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("kind", ["loop", "broken", "fifo"])
def test_copy_extra_files_names_a_bad_entry(scene, kind):
    entry = scene.base / "special"
    if kind == "loop":
        entry.symlink_to("special")
    elif kind == "broken":
        entry.symlink_to("nowhere")
    else:
        os.mkfifo(entry)  # reading it would hang the merge
    dest = scene.root / "dest"
    dest.mkdir()
    with pytest.raises(InputError, match=r"special (is a symlink loop|is a broken link|is not a regular file)"):
        copy_extra_files(scene.base, dest, [scene.base / "model.safetensors"], set())


def test_adapter_tokenizer_is_copied_only_from_inside_its_folder(scene):
    dest = scene.root / "dest"
    dest.mkdir()
    (scene.adapter / "tokenizer_config.json").write_text('{"added": 8}')
    (scene.adapter / "tokenizer.json").symlink_to("tokenizer_config.json")
    assert copy_tokenizer(scene.adapter, dest) == ["tokenizer.json", "tokenizer_config.json"]
    assert not (dest / "tokenizer.json").is_symlink() and (dest / "tokenizer.json").read_text() == '{"added": 8}'
    (scene.adapter / "tokenizer.model").symlink_to(scene.private / "secret.txt")
    with pytest.raises(InputError, match="tokenizer.model links to .*outside the model folder"):
        copy_tokenizer(scene.adapter, scene.root / "dest2")
    (scene.adapter / "tokenizer.model").unlink()
    (scene.adapter / "tokenizer.model").symlink_to("missing.model")
    with pytest.raises(InputError, match="tokenizer.model is a broken link"):
        copy_tokenizer(scene.adapter, scene.root / "dest2")


def test_resized_vocabulary_adapter_with_a_private_tokenizer_is_refused(llama_untied, tmp_path):
    """The one merge that copies an adapter's files: its tokenizer, when it resized the vocabulary."""
    from helpers import VOCAB, load_model, make_peft_adapter

    import lorafuse

    model = load_model(llama_untied)
    model.resize_token_embeddings(VOCAB + 8)
    adapter = make_peft_adapter(
        llama_untied, tmp_path / "adapter", module=model, target_modules=["q_proj"], modules_to_save=["embed_tokens"]
    )
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (adapter / "tokenizer_config.json").symlink_to(tmp_path / "secret.txt")
    before = snapshot(adapter, llama_untied)
    with pytest.raises(InputError, match="tokenizer_config.json links to .*outside the model folder"):
        lorafuse.merge(llama_untied, [adapter], tmp_path / "run" / "out")
    assert snapshot(adapter, llama_untied) == before
    if (tmp_path / "run").exists():  # the output's parent, if it was created, holds nothing
        assert_no_litter(tmp_path / "run")


def test_weights_found_by_find_model_weights_never_lead_outside(scene):
    (scene.base / "model.safetensors").unlink()
    (scene.base / "model.safetensors").symlink_to(scene.private / "secret.txt")
    with pytest.raises(InputError, match="model.safetensors links to .*outside the model folder"):
        find_model_weights(scene.base)
