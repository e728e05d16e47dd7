"""``lorafuse inspect``: adapters of every format lorafuse reads, and model folders."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_llama, make_peft_adapter
from safetensors.torch import load_file, save_file

from lorafuse.cli import main
from lorafuse.inspect import inspect_path, render

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny"
SCALE = 16 / 8  # the example adapter: lora_alpha 16, r 8


def example_pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) of the shipped example adapter."""
    state = load_file(EXAMPLE / "adapter" / "adapter_model.safetensors")
    pairs = {}
    for key, a in state.items():
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model.") : -len(".lora_A.weight")]
            pairs[module] = (a, state[key.replace("lora_A", "lora_B")])
    return pairs


def full_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((b.double() @ a.double()).norm()) * scale


def test_peft_adapter_report_and_norms():
    report = inspect_path(EXAMPLE / "adapter")
    assert report["kind"] == "adapter" and report["format"] == "peft"
    assert report["ranks"] == [8] and report["alphas"] == [16.0] and report["scalings"] == [2.0]
    assert report["base_model"] == "examples/tiny/base"
    assert report["use_rslora"] is False and report["use_dora"] is False
    assert report["parameters"] == sum(a.numel() + b.numel() for a, b in example_pairs().values())
    assert report["zero_effect"] == []
    rows = {r["target"]: r for r in report["modules"]}
    assert len(rows) == 14
    for module, (a, b) in example_pairs().items():
        assert rows[module + ".weight"]["norm"] == pytest.approx(full_norm(a, b, SCALE), rel=1e-9)


def test_gram_norm_matches_full_product_for_conv_shapes(tmp_path):
    from lorafuse.edits import LoraDelta, TensorRef
    from lorafuse.io.checkpoint import Checkpoint

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, 3, 3, generator=gen), torch.randn(5, 4, 1, 1, generator=gen)
    path = tmp_path / "conv.safetensors"
    save_file({"a": a, "b": b}, path)
    with Checkpoint([path]) as ckpt:
        edit = LoraDelta(TensorRef(ckpt, "a"), TensorRef(ckpt, "b"), -0.5, "conv")
        expected = float((b.reshape(5, 4).double() @ a.reshape(4, -1).double()).norm()) * 0.5
        assert edit.delta_norm() == pytest.approx(expected, rel=1e-12)


def test_zero_effect_modules_are_listed(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(EXAMPLE / "adapter", adapter)
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    state[key] = torch.zeros_like(state[key])
    save_file(state, adapter / "adapter_model.safetensors")
    report = inspect_path(adapter)
    assert report["zero_effect"] == ["model.layers.1.mlp.up_proj.weight"]
    assert "1 module(s) change nothing" in render(report)


def test_rslora_dora_rank_pattern(tmp_path):
    base = make_llama(tmp_path, name="llama")
    adapter = make_peft_adapter(
        base,
        tmp_path / "adapter",
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=8,
        use_rslora=True,
        use_dora=True,
        rank_pattern={"v_proj": 2},
    )
    report = inspect_path(adapter)
    assert report["use_rslora"] is True and report["use_dora"] is True
    assert report["ranks"] == [2, 4]
    assert report["scalings"] == [round(8 / math.sqrt(4), 6), round(8 / math.sqrt(2), 6)]
    assert report["alphas"] == [8.0]
    assert report["edit_kinds"] == {"dora": 4}
    assert report["config"]["rank_pattern"] == {"v_proj": 2}


def _single_file_adapters(root: Path) -> dict[str, Path]:
    """The example adapter re-saved as kohya, diffusion-layout and plain lora_A/lora_B files."""
    kohya, diffusion, plain = {}, {}, {}
    for module, (a, b) in example_pairs().items():
        flat = "lora_te_" + module.replace(".", "_")
        kohya |= {f"{flat}.lora_down.weight": a, f"{flat}.lora_up.weight": b, f"{flat}.alpha": torch.tensor(16.0)}
        diffusion |= {
            f"{module}.lora_down.weight": a,
            f"{module}.lora_up.weight": b,
            f"{module}.alpha": torch.tensor(16.0),
        }
        plain |= {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b, f"{module}.alpha": torch.tensor(16.0)}
    diffusion["model.norm.diff"] = torch.full((64,), 0.5)
    paths = {}
    for name, state in (("kohya", kohya), ("diffusion", diffusion), ("plain", plain)):
        paths[name] = root / f"{name}.safetensors"
        save_file(state, paths[name])
    return paths


@pytest.mark.parametrize("fmt", ["kohya", "diffusion", "plain"])
def test_single_file_formats(tmp_path, fmt):
    path = _single_file_adapters(tmp_path)[fmt]
    report = inspect_path(path)
    assert report["format"] == fmt
    assert report["ranks"] == [8] and report["alphas"] == [16.0] and report["scalings"] == [2.0]
    norms = sorted(r["norm"] for r in report["modules"] if r["kind"] == "lora")
    expected = sorted(full_norm(a, b, SCALE) for a, b in example_pairs().values())
    assert norms == pytest.approx(expected, rel=1e-9)
    if fmt == "diffusion":
        diff = next(r for r in report["modules"] if r["kind"] == "diff")
        assert diff["target"] == "model.norm.weight" and diff["norm"] == pytest.approx(0.5 * 8)


def test_kohya_names_resolve_against_a_base(tmp_path, capsys):
    path = _single_file_adapters(tmp_path)["kohya"]
    assert main(["inspect", str(path), "--base", str(EXAMPLE / "base"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["target"] for r in report["modules"]} == {m + ".weight" for m in example_pairs()}


def test_model_report(tmp_path):
    report = inspect_path(EXAMPLE / "base")
    assert report["kind"] == "model"
    assert report["architectures"] == ["Qwen3ForCausalLM"] and report["model_type"] == "qwen3"
    assert report["dtypes"] == {"bfloat16": {"tensors": 24, "parameters": report["parameters"]}}
    state = load_file(EXAMPLE / "base" / "model.safetensors")
    assert report["parameters"] == sum(t.numel() for t in state.values())
    assert report["tied_embeddings"] is True and report["lm_head_stored"] is False
    assert report["quantization"] is None and len(report["shards"]) == 1


def test_sharded_untied_model_and_pipeline(tmp_path, capsys):
    model = make_llama(tmp_path / "pipe", name="transformer")
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, model / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copytree(EXAMPLE / "base", tmp_path / "pipe" / "text_encoder")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    report = inspect_path(model)
    assert len(report["shards"]) > 1 and report["index"] == "model.safetensors.index.json"
    assert sum(s["tensors"] for s in report["shards"]) == report["tensors"]
    assert report["tied_embeddings"] is False and report["lm_head_stored"] is True
    assert main(["inspect", str(tmp_path / "pipe")]) == 0
    text = capsys.readouterr().out
    assert "[text_encoder]" in text and "[transformer]" in text and "Qwen3ForCausalLM" in text


def test_cli_table_and_json(capsys):
    assert main(["inspect", str(EXAMPLE / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in text and "||dW||_F" in text
    assert main(["inspect", str(EXAMPLE / "base"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "qwen3"
    assert main(["inspect", str(EXAMPLE / "missing")]) == 1


def test_rows_of_every_edit_kind_come_from_the_edits(tmp_path):
    """modules_to_save (replace), lora_bias (bias), trainable tokens and a diff: each row is what its edit
    describes, its norm the edit's own (None where the change depends on the base)."""
    base = make_llama(tmp_path, name="llama")
    adapter = make_peft_adapter(
        base,
        tmp_path / "adapter",
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
        lora_bias=True,
        trainable_token_indices={"embed_tokens": [1, 3]},
    )
    report = inspect_path(adapter)
    kinds = report["edit_kinds"]
    assert kinds["lora"] == kinds["bias"] and kinds["replace"] >= 1 and kinds["tokens"] == 1, kinds
    state = load_file(adapter / "adapter_model.safetensors")
    for row in report["modules"]:
        if row["kind"] == "bias":
            bias = state[row["source_key"]].double()
            assert row["norm"] == pytest.approx(float(bias.norm()) * row["scale"], rel=1e-9) and row["shape"]
        elif row["kind"] in ("replace", "tokens"):
            assert row["norm"] is None and row["zero_effect"] is False and "weight" in row
    tokens = next(r for r in report["modules"] if r["kind"] == "tokens")
    assert tokens["tokens"] == [1, 3] and tokens["target"].endswith("embed_tokens.weight")


def test_inspect_needs_no_torch_for_any_format(tmp_path):
    """Every format lorafuse reads (safetensors files) and a model folder inspect with torch missing."""
    paths = [EXAMPLE / "adapter", *_single_file_adapters(tmp_path).values(), EXAMPLE / "base"]
    script = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from lorafuse.inspect import inspect_path\n"
        f"for p in {[str(p) for p in paths]!r}:\n"
        "    r = inspect_path(p)\n"
        "    print(json.dumps([r['kind'], r.get('format'), [m['norm'] for m in r.get('modules', [])]]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r[1] for r in reports] == ["peft", "kohya", "diffusion", "plain", None]
    expected = sorted(full_norm(a, b, SCALE) for a, b in example_pairs().values())
    for _kind, _fmt, norms in reports[:4]:
        assert sorted(n for n in norms if n != pytest.approx(4.0)) == pytest.approx(expected, rel=1e-9)


def test_serving_vllm_verdict_names_each_failing_rule_with_its_fix(tmp_path, capsys):
    """inspect --serving vllm: the rules of vLLM 0.33.0 (tests/test_serving.py holds them against vLLM's source)."""
    base = make_llama(tmp_path / "models", model_type="qwen2")
    plain = make_peft_adapter(base, tmp_path / "plain", target_modules=["q_proj", "v_proj", "down_proj"], r=8)
    report = inspect_path(plain, serving="vllm")  # the base is the local folder adapter_config.json names
    assert report["serving"]["servable"] is True and report["serving"]["version"] == "0.33.0"
    assert inspect_path(plain)["serving"] is None

    awkward = make_peft_adapter(
        base,
        tmp_path / "awkward",
        target_modules=["q_proj", "lm_head"],
        modules_to_save=["model.norm"],
        use_dora=True,
        r=32,
    )
    report = inspect_path(awkward, serving="vllm", max_lora_rank=16)
    assert report["serving"]["servable"] is False
    failing = {f["rule"]: f for f in report["serving"]["findings"] if f["ok"] is False}
    # DoRA's magnitude vectors and the saved norm are tensors vLLM cannot parse either.
    assert sorted(failing) == ["modules_to_save", "rank", "target modules", "tensor names", "use_dora"]
    assert "lm_head" in failing["target modules"]["detail"] and "qwen2.py" in failing["target modules"]["detail"]
    assert failing["rank"]["fix"] == "serve with --max-lora-rank 32"
    assert all(f["fix"] for f in failing.values())

    assert main(["inspect", str(awkward), "--serving", "vllm", "--max-lora-rank", "32"]) == 0
    text = capsys.readouterr().out
    assert "vllm 0.33.0: NOT servable" in text and "FAIL use_dora: DoRA is set" in text and "FAIL rank" not in text
    assert main(["inspect", str(awkward), "--serving", "vllm", "--max-lora-rank", "12"]) == 1
    assert "accepts only 1, 8, 16" in capsys.readouterr().err
    assert main(["inspect", str(base), "--serving", "vllm"]) == 1
    assert "is a model, not an adapter" in capsys.readouterr().err


def test_serving_vllm_without_the_base_cannot_tell_the_target_modules(tmp_path):
    base = make_llama(tmp_path / "models")
    adapter = make_peft_adapter(base, tmp_path / "lora", target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/elses-model"  # a Hub id: not read
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    report = inspect_path(adapter, serving="vllm")
    assert report["serving"]["servable"] is None
    assert inspect_path(adapter, base=base, serving="vllm")["serving"]["servable"] is True
    kohya = tmp_path / "k.safetensors"
    save_file(
        {"lora_unet_q.lora_down.weight": torch.zeros(2, 8), "lora_unet_q.lora_up.weight": torch.zeros(8, 2)}, kohya
    )
    verdict = inspect_path(kohya, serving="vllm")["serving"]
    assert verdict["servable"] is False and verdict["findings"][0]["rule"] == "format"


def test_a_row_with_a_rank_but_no_scale_has_no_alpha():
    """An edit of another tuner type reporting a rank and no scale (HRA's reflections once did) gets no LoRA alpha,
    and the table shows what it reports."""
    from lorafuse.edits import Edit
    from lorafuse.inspect import _edit_row, _size_text

    class Reflections(Edit):
        def describe(self):
            return {"kind": "hra", "rank": 4, "apply_GS": False, "layer": None}

    row = _edit_row("lin.weight", Reflections(source_key="lin.hra_u"), rslora=False)
    assert "alpha" not in row and row["norm"] is None and row["zero_effect"] is False
    assert _size_text(row) == "rank=4 apply_GS=False"
