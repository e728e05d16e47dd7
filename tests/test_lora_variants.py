"""LoRA variants PEFT merges (VeLoRA, MonteCLoRA, BD-LoRA, KaSA) merged as PEFT's merge_and_unload merges them, and
the LoRA options PEFT cannot merge (or whose adapter needs a base lorafuse does not have) refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_peft_adapter, peft_merged, read_tensors
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from safetensors.torch import load_file, save_file
from torch import nn

import lorafuse
from lorafuse.cli import main
from lorafuse.edits import BlockOps, TensorRef
from lorafuse.errors import AdapterError
from lorafuse.formats.peft import read_peft_adapter
from lorafuse.verify import verify

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ["q_proj", "o_proj", "up_proj"]
VARIANTS = {
    "velora": dict(velora_config=VeloraConfig(num_groups=2)),
    "monteclora": dict(monteclora_config=MontecloraConfig()),
    "bdlora": dict(
        use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj", "up_proj"], target_modules_bd_b=["o_proj"], nblocks=2)
    ),
    "kasa": dict(kasa_config=KasaConfig()),
}


def targeted(expected: dict[str, torch.Tensor]) -> list[str]:
    names = [k for k in expected if any(f"{t}.weight" in k for t in TARGETS)]
    assert len(names) == 2 * len(TARGETS)
    return names


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_merges_like_peft(variant, llama_untied, tmp_path):
    adapter = make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=TARGETS, **VARIANTS[variant])
    out = tmp_path / "merged"
    lorafuse.merge(llama_untied, [adapter], out, dtype="fp32")
    expected = peft_merged(llama_untied, [adapter]).state_dict()
    merged, base = read_tensors(out), read_tensors(llama_untied)
    tol = 2e-5 if variant == "kasa" else 1e-6  # KaSA: numpy's SVD against torch's, both fp32
    for name in targeted(expected):
        torch.testing.assert_close(merged[name], expected[name], rtol=tol, atol=tol, msg=name)
        assert not torch.allclose(merged[name], base[name], atol=1e-3), name
    assert verify(out, llama_untied, [adapter], outputs=False).passed


def test_bdlora_reads_the_block_diagonal_factor_whole(llama_untied, tmp_path):
    adapter = make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=TARGETS, **VARIANTS["bdlora"])
    saved = load_file(adapter / "adapter_model.safetensors")
    read = read_peft_adapter(adapter)
    edits = {t.target: t.edit for t in read.edits}
    q = edits["model.layers.0.self_attn.q_proj.weight"]
    o = edits["model.layers.0.self_attn.o_proj.weight"]
    stacked = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert q.A.shape == (4, 32) and tuple(stacked.shape) == (4, 16) and o.B.shape == (32, 4)
    full = torch.block_diag(*torch.chunk(stacked, 2, dim=0))  # PEFT's weight_as_blockdiagonal_matrix
    np.testing.assert_array_equal(q.A.load(), full.numpy())
    read.checkpoint.close()


def test_kasa_truncates_the_weight_it_is_merged_into(llama_untied, tmp_path):
    """Through TorchOps (the CUDA kernel's operations, on the CPU here) as through numpy."""
    from lorafuse.engine.cuda import TorchOps

    adapter = make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=["q_proj"], **VARIANTS["kasa"])
    read = read_peft_adapter(adapter)
    edit = next(t.edit for t in read.edits if t.target == "model.layers.0.self_attn.q_proj.weight")
    weight = read_tensors(llama_untied)["model.layers.0.self_attn.q_proj.weight"]
    on_numpy = weight.numpy().copy()
    edit.apply(on_numpy, slice(0, 32), BlockOps())
    on_torch = weight.clone()
    edit.apply(on_torch, slice(0, 32), TorchOps("cpu"))
    np.testing.assert_allclose(on_torch.numpy(), on_numpy, rtol=1e-5, atol=2e-6)
    delta = on_numpy - weight.numpy()
    a, b = edit.A.load(), edit.B.load()
    lora = edit.scale * (b * edit.diag.load()) @ a
    assert np.abs(delta - lora).max() > 1e-3  # the truncation moved the weight, not only the update
    assert np.linalg.matrix_rank(on_numpy - lora, tol=1e-4) == 32 - 4
    read.checkpoint.close()


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_grouped_conv_lora_is_refused_by_name(tmp_path, capsys):
    torch.manual_seed(0)
    net = GroupedConv()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base / "model.safetensors")
    adapter = tmp_path / "adapter"
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    model.save_pretrained(adapter)
    with pytest.raises(NotImplementedError, match="groups > 1"):  # the oracle: PEFT cannot merge it
        model.merge_and_unload()
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "grouped conv LoRA cannot be merged (PEFT cannot either)" in err and "groups=2" in err


def with_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return adapter


@pytest.fixture
def plain_adapter(llama_untied, tmp_path):
    return make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=["q_proj"])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"arrow_config": {"top_k": 2}}, "Arrow routes each token"),
        ({"alora_invocation_tokens": [3, 4]}, "aLoRA acts only after"),
        ({"use_qalora": True}, "QALoRA pools the input"),
        ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication adds layers"),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga' changes the base weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "changes the base weights"),
        ({"use_dora": True, "kasa_config": {"beta": 0.1}}, "use_dora and kasa_config are set together"),
        ({"velora_config": 2}, "velora_config must be an object"),
    ],
)
def test_what_cannot_be_merged_is_refused_in_one_line(plain_adapter, llama_untied, tmp_path, changes, match, capsys):
    with_config(plain_adapter, **changes)
    with pytest.raises(AdapterError, match=match):
        lorafuse.merge(llama_untied, [plain_adapter], tmp_path / "out")
    assert main(["merge", str(llama_untied), str(plain_adapter), "-o", str(tmp_path / "out")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_variant_tensors_without_their_config_are_refused(llama_untied, tmp_path):
    adapter = make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=["q_proj"], **VARIANTS["kasa"])
    with_config(adapter, kasa_config=None)
    with pytest.raises(AdapterError, match="lora_diag.*kasa_config"):
        lorafuse.merge(llama_untied, [adapter], tmp_path / "out")


def test_bdlora_factor_that_cannot_hold_its_blocks_is_refused(llama_untied, tmp_path):
    adapter = make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=TARGETS, **VARIANTS["bdlora"])
    with_config(adapter, use_bdlora={"target_modules_bd_a": ["q_proj", "up_proj"], "target_modules_bd_b": ["o_proj"],
                                     "nblocks": 3})  # fmt: skip
    with pytest.raises(AdapterError, match="cannot hold 3 diagonal blocks"):
        lorafuse.merge(llama_untied, [adapter], tmp_path / "out")


def test_kasa_needs_its_rank_below_the_weight_size(tmp_path):
    checkpoint_dir = tmp_path / "t"
    checkpoint_dir.mkdir()
    from lorafuse.io.checkpoint import Checkpoint
    from lorafuse.tuners.lora_variants import KasaDelta

    save_file({"a": torch.ones(4, 4), "b": torch.ones(4, 4), "d": torch.ones(4)}, checkpoint_dir / "x.safetensors")
    ckpt = Checkpoint([checkpoint_dir / "x.safetensors"])
    edit = KasaDelta(TensorRef(ckpt, "a"), TensorRef(ckpt, "b"), 1.0, diag=TensorRef(ckpt, "d"))
    assert "leaves nothing" in edit.shape_error((4, 4))
    assert edit.shape_error((4, 4)) is not None and edit.no_effect() is False
    ckpt.close()


class AttentionNet(nn.Module):
    """nn.MultiheadAttention (in_proj_weight, out_proj) and a Linear head; no config.json."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x)[0])


def attention_net(folder=None) -> AttentionNet:
    torch.manual_seed(0)
    net = AttentionNet()
    if folder is not None:
        net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval()


@pytest.mark.parametrize("lora_bias", [False, True])
def test_multihead_attention_lora_merges_like_peft(lora_bias, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in attention_net().state_dict().items()}, base / "model.safetensors")
    adapter = make_peft_adapter(
        base, tmp_path / "adapter", module=attention_net(base), target_modules=["mha", "head"], lora_bias=lora_bias
    )
    out = tmp_path / "merged"
    report = lorafuse.merge(base, [adapter], out, dtype="fp32")
    assert report.warnings == []  # "mha" in target_modules is the module its LoRAs were read for
    peft = peft_merged(base, [adapter], module=attention_net(base))
    expected, merged, original = peft.state_dict(), read_tensors(out), read_tensors(base)
    assert merged.keys() == expected.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    changed = {k for k in merged if not torch.equal(merged[k], original[k])}
    assert {"mha.in_proj_weight", "mha.out_proj.weight", "head.weight"} <= changed
    assert ("mha.out_proj.bias" in changed) == lora_bias
    net = attention_net(out)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), peft(x), rtol=1e-5, atol=1e-5)


def test_kasa_beside_another_adapter_on_the_same_weight_is_refused(llama_untied, plain_adapter, tmp_path):
    """KaSA rewrites the weight it is loaded on; with another adapter on it, no order is the trained model."""
    kasa = make_peft_adapter(llama_untied, tmp_path / "kasa", target_modules=["q_proj"], **VARIANTS["kasa"])
    for adapters in ([plain_adapter, kasa], [kasa, kasa]):
        with pytest.raises(AdapterError, match="rewrites base tensor .*q_proj.*merge this adapter alone"):
            lorafuse.merge(llama_untied, adapters, tmp_path / "out")
