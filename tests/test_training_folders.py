"""``lorafuse merge BASE out/`` where out/ is what a real transformers.Trainer run wrote: its latest checkpoint by
step number (checkpoint-10 after checkpoint-9), or the final adapter trainer.save_model() put at the top; and the
tokenizer (chat template included) the trainer saved with the adapter goes into the merged model, with a message.

The folders come from a real Trainer run on a tiny Llama with a PEFT LoRA (seconds on CPU); the oracle is PEFT's
merge_and_unload of the adapter the test expects to be chosen.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, input_ids, make_llama, read_tensors

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import InputError, SourceError

STEPS, SAVE_EVERY = 10, 3  # saves at steps 3, 6, 9 and the last one, 10: "checkpoint-10" sorts before "-9"
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def _tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.chat_template = chat_template
    return tokenizer


class _Toy(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(2, VOCAB, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, trainer output folder): a tiny Llama with a tokenizer, and a Trainer run's checkpoints."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("training")
    base = make_llama(root, name="base")
    _tokenizer(None).save_pretrained(base)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    args = TrainingArguments(
        output_dir=str(root / "out"),
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        per_device_train_batch_size=4,
        learning_rate=5e-2,  # lora_B moves off zero within a step: every checkpoint differs
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Toy(), processing_class=_tokenizer(CHAT_TEMPLATE))
    trainer.train()
    return base, root / "out"


def _copy(out: Path, dest: Path) -> Path:
    return Path(shutil.copytree(out, dest))


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _assert_merged_from(out: Path, base: Path, adapter: Path) -> None:
    ours, expected = read_tensors(out), _peft_merged(base, adapter)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_the_trainer_wrote_what_the_module_expects(trained):
    """The facts sources/training.py is built on, read from the real run."""
    _base, out = trained
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-10", "checkpoint-3", "checkpoint-6", "checkpoint-9"]
    checkpoint = out / "checkpoint-10"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "tokenizer_config.json").is_file()
    assert (checkpoint / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_the_latest_checkpoint_by_step_is_merged_and_named(trained, tmp_path, capsys):
    base, out = trained
    merged = tmp_path / "merged"
    assert main(["merge", str(base), str(out), "-o", str(merged), "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert f"taking its latest checkpoint, checkpoint-10 (step {STEPS}" in err
    _assert_merged_from(merged, base, out / "checkpoint-10")
    # The wrong choices would give other weights: the checkpoints differ (the test can fail).
    nine, ten = (read_tensors(out / f"checkpoint-{s}") for s in (9, 10))
    assert any(not torch.equal(nine[k], ten[k]) for k in ten)


def test_a_training_folder_alone_names_its_base(trained, tmp_path, capsys):
    """``lorafuse merge out/ -o M``: the base comes from the chosen checkpoint's adapter_config.json."""
    base, out = trained
    assert main(["merge", str(out), "-o", str(tmp_path / "merged"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint-10" in captured.err and f"base model {base}" in captured.err
    assert f"tokenizer    from {out / 'checkpoint-10'}, over the base's" in captured.out.splitlines()


def test_the_trainer_tokenizer_and_chat_template_replace_the_base(trained, tmp_path):
    base, out = trained
    report = lorafuse.merge(base, [out], tmp_path / "merged")
    merged = tmp_path / "merged"
    assert (merged / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert report.tokenizer_from == str(out / "checkpoint-10")
    assert any("tokenizer files of" in w and "replace the base's" in w for w in report.warnings)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False)
    assert text == "<|user|>w5"
    model = AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        assert model(input_ids()).logits.shape[-1] == VOCAB


def test_a_top_level_adapter_is_the_one_merged(trained, tmp_path, capsys):
    """trainer.save_model(out) puts the final adapter at the top: that one is meant, not a checkpoint."""
    base, out = trained
    copy = _copy(out, tmp_path / "out")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / "checkpoint-3" / name, copy / name)  # a final adapter other than the latest checkpoint
    assert main(["merge", str(base), str(copy), "-o", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert "adapter at its top level" in err and "checkpoint-10" in err
    _assert_merged_from(tmp_path / "merged", base, out / "checkpoint-3")


def test_a_latest_checkpoint_without_an_adapter_is_refused(trained, tmp_path):
    base, out = trained
    copy = _copy(out, tmp_path / "out")
    (copy / "checkpoint-10" / "adapter_model.safetensors").unlink()
    with pytest.raises(SourceError, match="checkpoint-10, the latest checkpoint .* holds no adapter"):
        lorafuse.merge(base, [copy], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_the_best_checkpoint_is_named_when_the_state_records_another(trained, tmp_path):
    base, out = trained
    copy = _copy(out, tmp_path / "out")
    state = copy / "checkpoint-10" / "trainer_state.json"
    text = state.read_text()
    assert '"best_model_checkpoint": null' in text  # what this run recorded (no evaluation)
    state.write_text(text.replace('"best_model_checkpoint": null', f'"best_model_checkpoint": "{out}/checkpoint-6"'))
    report = lorafuse.merge(base, [copy], tmp_path / "merged", dry_run=True)
    note = report.sources["adapters"][0]["training_output"]["note"]
    assert "names checkpoint-6 as the best" in note and str(copy / "checkpoint-6") in note


def test_a_tokenizer_linking_out_of_the_checkpoint_is_refused_before_writing(trained, tmp_path):
    base, out = trained
    copy = _copy(out, tmp_path / "out")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (copy / "checkpoint-10" / "tokenizer.json").unlink()
    os.symlink(secret, copy / "checkpoint-10" / "tokenizer.json")
    with pytest.raises(InputError, match="tokenizer.json links to .*outside"):
        lorafuse.merge(base, [copy], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_tokenizer_equal_to_the_base_s_changes_nothing_silently(trained, tmp_path):
    base, out = trained
    copy = _copy(out, tmp_path / "out")
    checkpoint = copy / "checkpoint-10"
    (checkpoint / "chat_template.jinja").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, checkpoint / name)
    report = lorafuse.merge(base, [copy], tmp_path / "merged")
    assert report.tokenizer_from is None and not any("tokenizer" in w for w in report.warnings)
    assert not (tmp_path / "merged" / "chat_template.jinja").exists()


def test_two_adapters_with_different_tokenizers_keep_the_base_s(trained, tmp_path):
    base, out = trained
    other = _copy(out / "checkpoint-9", tmp_path / "other")
    (other / "chat_template.jinja").write_text("{{ messages }}")
    report = lorafuse.merge(base, [out, other], tmp_path / "merged")
    assert report.tokenizer_from is None
    assert any("hold different tokenizer files" in w for w in report.warnings)
    assert not (tmp_path / "merged" / "chat_template.jinja").exists()


@pytest.mark.parametrize("kind", ["broken link", "link out", "file", "same step"])
def test_a_checkpoint_entry_that_cannot_be_read_is_refused_not_skipped(trained, tmp_path, kind):
    """Skipping it would merge an older checkpoint without a word."""
    base, out = trained
    copy = _copy(out, tmp_path / "out")
    entry = copy / ("checkpoint-010" if kind == "same step" else "checkpoint-20")
    if kind == "broken link":
        entry.symlink_to(tmp_path / "gone")
    elif kind == "link out":
        entry.symlink_to(shutil.copytree(out / "checkpoint-10", tmp_path / "elsewhere"))
    elif kind == "file":
        entry.write_text("x")
    else:
        shutil.copytree(out / "checkpoint-9", entry)
    expected = {
        "broken link": "is a broken link",
        "link out": "outside the model folder",
        "file": "is not a folder",
        "same step": "both step 10",
    }[kind]
    with pytest.raises((InputError, SourceError), match=expected):
        lorafuse.merge(base, [copy], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_verify_names_the_checkpoint_it_took_in_its_report(trained, tmp_path, capsys):
    """Given the training folder, or reading the merged folder's record of it: the checkpoint is in the printed
    report (stdout, so also with -q), not only in the -v log."""
    base, out = trained
    merged = tmp_path / "merged"
    assert main(["merge", str(base), str(out), "-o", str(merged), "-q"]) == 0
    capsys.readouterr()
    verify = ["verify", str(merged), "--no-output-check", "-q"]
    assert main([*verify, "--base", str(base), "--adapter", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"adapters     {out / 'checkpoint-10'} (weight 1)" in lines
    assert (
        f"note: {out} is a training output folder: taking its latest checkpoint, checkpoint-10 (step 10"
        in "\n".join(lines)
    )
    assert main(verify) == 0  # what lorafuse_merge.json records: the checkpoint itself
    (inputs,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("inputs")]
    assert f"adapters {out / 'checkpoint-10'} (weight 1)" in inputs
