"""lorafuse combine: cat is exact, linear and svd match PEFT's add_weighted_adapter, svd reports its error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import input_ids, load_conv_net, load_model, make_peft_adapter, peft_merged, peft_model, read_tensors
from peft import PeftModel
from safetensors.torch import load_file

import lorafuse
from lorafuse.cli import main
from lorafuse.combine import combine
from lorafuse.errors import AdapterError, LorafuseError, OutputError

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]
TINY_ADAPTER = Path(__file__).resolve().parents[1] / "examples" / "tiny" / "adapter"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def adapters(llama_untied, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("combine-adapters")
    return {
        "r4": make_peft_adapter(llama_untied, root / "r4", r=4, lora_alpha=8, target_modules=TARGETS),
        "r4b": make_peft_adapter(
            llama_untied, root / "r4b", seed=2, r=4, lora_alpha=3, target_modules=["q_proj", "k_proj", "down_proj"]
        ),
        "r6": make_peft_adapter(
            llama_untied, root / "r6", seed=3, r=6, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"]
        ),
        "emb": make_peft_adapter(llama_untied, root / "emb", seed=4, r=2, target_modules=["embed_tokens", "v_proj"]),
    }


def test_cat_is_exact_against_merging_in_sequence(llama_untied, adapters, tmp_path):
    order, weights = [adapters["r4"], adapters["r6"], adapters["r4b"]], [0.7, -1.3, 1.1]
    report = combine(order, tmp_path / "cat", method="cat", weights=weights)
    assert report.rank == 14 and report.svd_error_max is None
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 14 and config["use_rslora"] is False
    lorafuse.merge(llama_untied, [tmp_path / "cat"], tmp_path / "m1", dtype="fp32")
    lorafuse.merge(llama_untied, order, tmp_path / "m2", weights=weights, dtype="fp32")
    one, seq = read_tensors(tmp_path / "m1"), read_tensors(tmp_path / "m2")
    changed = 0
    for key, value in seq.items():
        assert_close(one[key], value)
        changed += not torch.equal(value, read_tensors(llama_untied)[key]) if key.endswith("q_proj.weight") else 0
    assert changed == 2


def test_cat_loads_in_peft_with_embeddings(llama_untied, adapters, tmp_path):
    order, weights = [adapters["emb"], adapters["r4"]], [1.5, 0.5]
    combine(order, tmp_path / "cat", method="cat", weights=weights)
    keys = load_file(tmp_path / "cat" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    combined = PeftModel.from_pretrained(load_model(llama_untied), tmp_path / "cat").eval()
    assert_close(logits(combined), logits(peft_model(llama_untied, order, weights)))


def test_linear_matches_peft_add_weighted_adapter(llama_untied, adapters, tmp_path):
    order, weights = [adapters["r4"], adapters["r4b"]], [0.8, -0.6]
    report = combine(order, tmp_path / "lin", method="linear", weights=weights)
    assert report.rank == 4
    model = PeftModel.from_pretrained(load_model(llama_untied), order[0], adapter_name="a0")
    model.load_adapter(order[1], adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type="linear")
    expected = {k: v for k, v in model.state_dict().items() if ".mix." in k and ("lora_A" in k or "lora_B" in k)}
    ours = {k: v for k, v in load_file(tmp_path / "lin" / "adapter_model.safetensors").items() if ".lora_" in k}
    assert len(ours) == len(expected) == 2 * (2 * 5 + 1)  # modules of either adapter in both layers, and the head
    for key, value in expected.items():
        assert_close(ours[key.replace(".mix.", ".")], value)
    # And the output loads in PEFT with the same effect as PEFT's own mix.
    model.set_adapter("mix")
    loaded = PeftModel.from_pretrained(load_model(llama_untied), tmp_path / "lin").eval()
    assert_close(logits(loaded), logits(model.eval()))


def test_linear_refuses_unequal_ranks(adapters, tmp_path):
    with pytest.raises(AdapterError, match="needs equal ranks.*use --method cat or svd"):
        combine([adapters["r4"], adapters["r6"]], tmp_path / "x", method="linear")
    assert not (tmp_path / "x").exists()


def _products(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / "adapter_model.safetensors")
    return {
        k[: -len(".lora_A.weight")]: tensors[k.replace("lora_A", "lora_B")] @ v
        for k, v in tensors.items()
        if k.endswith("lora_A.weight")
    }


def test_svd_full_rank_is_exact_and_reports_its_error(llama_untied, adapters, tmp_path):
    order, weights = [adapters["r4"], adapters["r6"]], [1.0, 0.5]
    report = combine(order, tmp_path / "svd", method="svd", weights=weights, rank=10)
    assert report.svd_error_max is not None and report.svd_error_max <= 1e-6
    combine(order, tmp_path / "cat", method="cat", weights=weights)
    svd, cat = _products(tmp_path / "svd"), _products(tmp_path / "cat")
    for name, value in cat.items():
        assert_close(svd[name], value)


def test_svd_truncation_matches_peft_and_reports_the_true_error(llama_untied, adapters, tmp_path):
    order, weights = [adapters["r4"], adapters["r6"]], [1.0, -0.5]
    report = combine(order, tmp_path / "svd", method="svd", weights=weights, rank=3)
    assert report.rank == 3
    model = PeftModel.from_pretrained(load_model(llama_untied), order[0], adapter_name="a0")
    model.load_adapter(order[1], adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type="svd", svd_rank=3)
    ours = _products(tmp_path / "svd")
    state = model.state_dict()
    errors = []
    for name, product in ours.items():
        peft_product = state[f"{name}.lora_B.mix.weight"] @ state[f"{name}.lora_A.mix.weight"]
        assert_close(product, peft_product, tol=1e-4)
        layer = model.base_model.model.get_submodule(name.replace("base_model.model.", ""))
        full = sum(layer.get_delta_weight(a) * w for a, w in zip(["a0", "a1"], weights) if a in layer.lora_A)
        errors.append(((full - product).norm() / full.norm()).item())
    assert report.svd_error_max == pytest.approx(max(errors), rel=1e-3)
    assert report.svd_error_max > 0.05


def test_combine_conv_layers(conv_net, tmp_path):
    net = load_conv_net(conv_net)
    kwargs = {"module": net, "target_modules": ["conv1", "conv2", "head"]}
    a = make_peft_adapter(conv_net, tmp_path / "a", **kwargs)
    b = make_peft_adapter(conv_net, tmp_path / "b", seed=5, r=2, **{**kwargs, "module": load_conv_net(conv_net)})
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    expected = peft_model(conv_net, [a, b], [0.5, 2.0], module=load_conv_net(conv_net))
    for method in ("cat", "svd"):
        combine([a, b], tmp_path / method, method=method, weights=[0.5, 2.0], rank=6 if method == "svd" else None)
        loaded = PeftModel.from_pretrained(load_conv_net(conv_net), tmp_path / method).eval()
        with torch.no_grad():
            assert_close(loaded(x), expected(x), tol=1e-4)


def test_lora_bias_and_modules_to_save_are_carried(qwen2, tmp_path):
    a = make_peft_adapter(qwen2, tmp_path / "a", target_modules=["q_proj", "k_proj"], lora_bias=True)
    b = make_peft_adapter(qwen2, tmp_path / "b", seed=3, target_modules=["q_proj"], modules_to_save=["lm_head"])
    report = combine([a, b], tmp_path / "cat", weights=[0.4, 1.0])
    assert report.carried_tensors == 1
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["modules_to_save"] == ["lm_head"]
    loaded = PeftModel.from_pretrained(load_model(qwen2), tmp_path / "cat").eval()
    assert_close(logits(loaded), logits(peft_model(qwen2, [a, b], [0.4, 1.0])))


def test_two_trained_copies_of_one_module_are_refused(qwen2, tmp_path):
    a = make_peft_adapter(qwen2, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"])
    b = make_peft_adapter(qwen2, tmp_path / "b", seed=3, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="modules_to_save"):
        combine([a, b], tmp_path / "x")


def test_dora_is_refused(llama_untied, tmp_path):
    dora = make_peft_adapter(llama_untied, tmp_path / "d", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        combine([dora], tmp_path / "x")


def test_cli_refuses_non_empty_output_without_overwrite(adapters, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["combine", str(adapters["r4"]), str(adapters["r6"]), "-o", str(out), "--method", "svd", "--rank", "2"]
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*argv, "--overwrite", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "svd" and report["rank"] == 2 and report["svd_error_max"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert main(["combine", str(adapters["r4"]), "-o", str(tmp_path / "y"), "--weights", "1", "2"]) == 1
    assert "2 weights for 1 adapters" in capsys.readouterr().err


def test_bad_arguments(adapters, tmp_path):
    with pytest.raises(LorafuseError, match="unknown method"):
        combine([adapters["r4"]], tmp_path / "x", method="ties")
    with pytest.raises(LorafuseError, match="--rank applies to --method svd"):
        combine([adapters["r4"]], tmp_path / "x", method="cat", rank=3)
    with pytest.raises(OutputError, match="would overwrite the input"):
        combine([adapters["r4"]], adapters["r4"], overwrite=True)


@pytest.mark.parametrize(
    "flags",
    [
        ["--weight", "0.5", "--weight", "-1.5"],  # once per adapter, as merge takes it
        ["--weight", "0.5", "-1.5"],  # several values after one flag
        ["--weights", "0.5", "-1.5"],  # the old spelling
        ["--weights", "0.5", "--weight=-1.5"],
    ],
)
def test_weight_flag_forms(adapters, tmp_path, capsys, flags):
    argv = ["combine", str(adapters["r4"]), str(adapters["r4b"]), "-o", str(tmp_path / "out"), *flags, "--json"]
    assert main(argv) == 0
    assert [a["weight"] for a in json.loads(capsys.readouterr().out)["adapters"]] == [0.5, -1.5]


@pytest.mark.parametrize("flag", ["--weight", "--weights"])
def test_weight_errors_name_the_flag_typed(adapters, tmp_path, capsys, flag):
    assert main(["combine", str(adapters["r4"]), "-o", str(tmp_path / "out"), f"{flag}=nan"]) == 1
    assert f"{flag} is nan, not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


NO_TORCH = "import sys; sys.modules['torch'] = None; from lorafuse.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize(
    "case",
    [
        ("tiny-cat", ["tiny", "tiny"], ["--weight", "0.5", "0.25"]),
        ("tiny-svd-bf16", ["tiny", "tiny"], ["--method", "svd", "--weight", "1", "-0.5", "--dtype", "bf16"]),
        ("svd", ["r4", "r6"], ["--method", "svd", "--rank", "3", "--weight", "1", "-0.5"]),
        ("linear-fp16", ["r4", "r4b"], ["--method", "linear", "--dtype", "fp16"]),
        ("embeddings", ["emb", "r4"], ["--weight", "1.5", "0.5"]),
    ],
    ids=lambda case: case[0],
)
def test_combine_runs_without_torch_and_writes_the_same_bytes(adapters, tmp_path, case):
    _name, inputs, flags = case
    paths = [str(TINY_ADAPTER if key == "tiny" else adapters[key]) for key in inputs]
    argv = ["combine", *paths, *flags]
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv, "-o", str(tmp_path / "no-torch")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert main([*argv, "-o", str(tmp_path / "here")]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "no-torch" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


def test_kasa_is_refused_by_its_kind(llama_untied, tmp_path):
    """KaSA's update is more than its factors (a truncation of the base and lora_diag): never summed as LoRA."""
    from peft.tuners.lora.config import KasaConfig

    adapter = make_peft_adapter(llama_untied, tmp_path / "a", target_modules=["q_proj"], kasa_config=KasaConfig())
    with pytest.raises(AdapterError, match="is a kasa update, which one LoRA adapter cannot hold"):
        combine([adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bdlora_combines_into_a_plain_lora_that_peft_merges_alike(llama_untied, tmp_path):
    """BD-LoRA's block-diagonal factor is written whole, and the written config turns the variant off: PEFT then
    merges the combined adapter as it merges the BD-LoRA one."""
    from peft.tuners.lora.config import BdLoraConfig

    bdlora = BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["o_proj"], nblocks=2)
    adapter = make_peft_adapter(llama_untied, tmp_path / "a", target_modules=["q_proj", "o_proj"], use_bdlora=bdlora)
    out = tmp_path / "out"
    combine([adapter], out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "use_bdlora" not in config
    expected = peft_merged(llama_untied, [adapter]).state_dict()
    got = peft_merged(llama_untied, [out]).state_dict()
    base = load_model(llama_untied).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.allclose(expected[name], base[name], atol=1e-4), name
