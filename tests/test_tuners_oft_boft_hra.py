"""Native OFT, BOFT and HRA merges compute what PEFT's ``merge_and_unload()`` computes.

The oracle is PEFT itself: each adapter is created with PEFT on a small model (custom Linear/Conv2d/Embedding
layers, a tiny Qwen3 from a transformers config), its parameters moved well off PEFT's identity initialisation,
saved, merged by PEFT and by lorafuse, and compared tensor by tensor (and by logits for Qwen3).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft.tuners.boft.layer as boft_layer
import pytest
import torch
from helpers import read_tensors
from peft import BOFTConfig, HRAConfig, LoraConfig, OFTConfig, PeftModel, get_peft_model
from peft.tuners.oft.layer import OFTRotationModule
from safetensors.torch import load_file, save_file
from torch import nn
from tuner_helpers import load_module, peft_merged_in_turn, save_module

import lorafuse
from lorafuse.cli import main
from lorafuse.edits import BlockOps, TensorRef
from lorafuse.errors import AdapterError, LorafuseError, ShapeMismatchError
from lorafuse.inspect import inspect_adapter
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.tuners.boft import BoftRotation, butterfly_order
from lorafuse.tuners.hra import HraReflection
from lorafuse.tuners.oft import OftRotation

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT on BOFT's CUDA extension, OFT's unscalable merges
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ATOL = 2e-6  # fp32 results of two implementations of the same math (both compute the small matrices in fp32)
QWEN3_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def no_boft_cuda_build(monkeypatch):
    """PEFT tries to compile BOFT's CUDA extension for every layer and falls back to one butterfly factor."""
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)


class TinyNet(nn.Module):
    """Every layer type these tuners merge: an embedding, Linear layers with and without a bias, Conv2d 3x3/1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 16)
        self.lin = nn.Linear(16, 8)
        self.proj = nn.Linear(8, 16, bias=False)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.point = nn.Conv2d(6, 8, 1)


class ButterflyNet(nn.Module):
    """Layers whose inputs (16) allow several BOFT butterfly factors of 2-blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.conv = nn.Conv2d(4, 6, 2)


def _save_net(net: nn.Module, folder: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return save_module(net, folder)


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory) -> Path:
    return _save_net(TinyNet(), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def butterfly_net(tmp_path_factory) -> Path:
    return _save_net(ButterflyNet(), tmp_path_factory.mktemp("models") / "butterfly")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    """A 2-layer Qwen3 (q/k norms, head_dim 8) from a transformers config."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(param + 0.05 * noise if param.dim() < 2 else 0.05 * noise)
    folder = tmp_path_factory.mktemp("models") / "qwen3"
    model.save_pretrained(folder)
    return folder


def _randomize_adapter(model: nn.Module, seed: int) -> None:
    """Move every adapter parameter well off PEFT's identity initialisation (rotations by tens of degrees)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen)
            if "boft_s" in name:
                param.copy_(1 + 0.3 * noise)
            elif "hra_u" in name:
                param.copy_(noise)
            else:
                param.copy_(0.3 * noise)


def _make_adapter(model: nn.Module, config, folder: Path, seed: int = 1) -> Path:
    peft_model = get_peft_model(model, config)
    _randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(folder)
    return folder


def _assert_tensors_match(out: Path, expected: dict[str, torch.Tensor]) -> float:
    """Every expected tensor matches the merged one; returns the largest difference."""
    merged = read_tensors(out)
    worst = 0.0
    for key, value in expected.items():
        got = merged[key]
        torch.testing.assert_close(got, value, rtol=0, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
        worst = max(worst, float((got - value).abs().max()))
    return worst


def _changed(base: Path, out: Path) -> set[str]:
    before, after = read_tensors(base), read_tensors(out)
    return {k for k in before if not torch.equal(before[k], after[k])}


OFT_CASES = {
    "neumann": dict(oft_block_size=4),
    "neumann-3-terms": dict(oft_block_size=4, num_cayley_neumann_terms=3),
    "neumann-8-terms": dict(oft_block_size=2, num_cayley_neumann_terms=8),
    "exact-cayley": dict(oft_block_size=4, use_cayley_neumann=False),
    "r-blocks": dict(r=2, oft_block_size=0, use_cayley_neumann=False),
    "block-share": dict(oft_block_size=4, block_share=True),
    "coft": dict(oft_block_size=4, coft=True, eps=0.5),
    "coft-exact-shared": dict(oft_block_size=2, coft=True, eps=0.3, block_share=True, use_cayley_neumann=False),
}


@pytest.mark.parametrize("case", list(OFT_CASES))
def test_oft_matches_peft_on_linear_conv_and_embedding(case, tiny_net, tmp_path):
    targets = ["emb", "lin", "proj", "conv", "point"]
    config = OFTConfig(target_modules=targets, init_weights=False, **OFT_CASES[case])
    adapter = _make_adapter(load_module(TinyNet(), tiny_net), config, tmp_path / "oft")
    out = tmp_path / "merged"
    report = lorafuse.merge(tiny_net, [adapter], out, dtype="fp32")
    assert report.warnings == []
    _assert_tensors_match(out, peft_merged_in_turn(load_module(TinyNet(), tiny_net), [adapter]))
    assert _changed(tiny_net, out) == {f"{t}.weight" for t in targets}  # biases untouched, as PEFT leaves them


# (targets, BOFTConfig kwargs): PEFT refuses a block size that does not divide a layer's inputs (point has 6)
BOFT_CASES = {
    "block-size": (["lin", "proj", "conv"], dict(boft_block_size=4)),
    "block-num": (["lin", "proj", "conv", "point"], dict(boft_block_num=2, boft_block_size=0)),
    "blocks-of-2": (["lin", "proj", "conv", "point"], dict(boft_block_size=2)),
}


@pytest.mark.parametrize("case", list(BOFT_CASES))
def test_boft_matches_peft_on_linear_and_conv(case, tiny_net, tmp_path):
    targets, kwargs = BOFT_CASES[case]
    config = BOFTConfig(target_modules=targets, init_weights=False, **kwargs)
    adapter = _make_adapter(load_module(TinyNet(), tiny_net), config, tmp_path / "boft")
    out = tmp_path / "merged"
    lorafuse.merge(tiny_net, [adapter], out, dtype="fp32")
    _assert_tensors_match(out, peft_merged_in_turn(load_module(TinyNet(), tiny_net), [adapter]))
    assert _changed(tiny_net, out) == {f"{t}.weight" for t in targets}  # boft_s scales weights, never biases


def _fast_block_diag(monkeypatch) -> None:
    """PEFT's multi-factor BOFT (its CUDA path): the same math, with the CUDA block_diag done by torch."""
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(
        boft_layer.FastBlockDiag,
        "apply",
        staticmethod(lambda x: torch.stack([torch.block_diag(*torch.unbind(f)) for f in x])),
    )


@pytest.mark.parametrize("factors", [2, 3])
def test_boft_butterfly_factors_match_peft(factors, butterfly_net, tmp_path, monkeypatch):
    _fast_block_diag(monkeypatch)
    config = BOFTConfig(
        target_modules=["lin", "conv"], boft_block_size=2, boft_n_butterfly_factor=factors, init_weights=False
    )
    adapter = _make_adapter(load_module(ButterflyNet(), butterfly_net), config, tmp_path / "boft")
    assert load_file(adapter / "adapter_model.safetensors")["base_model.model.lin.boft_R"].shape[0] == factors
    out = tmp_path / "merged"
    lorafuse.merge(butterfly_net, [adapter], out, dtype="fp32")
    _assert_tensors_match(out, peft_merged_in_turn(load_module(ButterflyNet(), butterfly_net), [adapter]))


@pytest.mark.parametrize("n, blocks, half", [(16, 8, 1), (16, 4, 1), (36, 6, 3), (48, 4, 3), (64, 2, 4)])
def test_butterfly_order_is_peft_s_permutation(n, blocks, half):
    """x[:, perm] and x[:, argsort(perm)] (x P^T and x P) for PEFT's butterfly permutation matrix P."""
    layer = boft_layer.BOFTLayer.__new__(boft_layer.BOFTLayer)
    perm = layer.block_butterfly_perm(n, blocks, half, 1).numpy()
    assert not (perm == np.arange(n)).all() or n // blocks == 2 * half
    columns = np.arange(n).reshape(1, -1)
    np.testing.assert_array_equal(butterfly_order(columns, blocks, half)[0], perm)
    np.testing.assert_array_equal(butterfly_order(columns, blocks, half, inverse=True)[0], np.argsort(perm))


@pytest.mark.parametrize("gs", [False, True])
@pytest.mark.parametrize("rank", [3, 4])
def test_hra_matches_peft_on_linear_and_conv(gs, rank, tiny_net, tmp_path):
    targets = ["lin", "proj", "conv", "point"]
    config = HRAConfig(target_modules=targets, r=rank, apply_GS=gs, init_weights=False)
    adapter = _make_adapter(load_module(TinyNet(), tiny_net), config, tmp_path / "hra")
    out = tmp_path / "merged"
    lorafuse.merge(tiny_net, [adapter], out, dtype="fp32")
    _assert_tensors_match(out, peft_merged_in_turn(load_module(TinyNet(), tiny_net), [adapter]))
    assert _changed(tiny_net, out) == {f"{t}.weight" for t in targets}


def _qwen3_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


QWEN3_CONFIGS = {
    "oft": lambda: OFTConfig(target_modules=QWEN3_ALL, oft_block_size=8, init_weights=False),
    "boft": lambda: BOFTConfig(target_modules=QWEN3_ALL, boft_block_size=8, init_weights=False),
    "hra": lambda: HRAConfig(target_modules=QWEN3_ALL, r=4, init_weights=False),
}


@pytest.mark.parametrize("tuner", list(QWEN3_CONFIGS))
def test_qwen3_through_the_cli_matches_peft(tuner, qwen3, tmp_path):
    adapter = _make_adapter(_qwen3_model(qwen3), QWEN3_CONFIGS[tuner](), tmp_path / tuner)
    out = tmp_path / "merged"
    assert main(["merge", str(qwen3), str(adapter), "-o", str(out), "--dtype", "fp32"]) == 0
    expected_model = PeftModel.from_pretrained(_qwen3_model(qwen3), adapter).merge_and_unload().eval()
    _assert_tensors_match(out, {k: v.detach() for k, v in expected_model.state_dict().items()})
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(_qwen3_model(out), ids), _logits(expected_model, ids), rtol=1e-5, atol=1e-5)
    assert len(_changed(qwen3, out)) == 2 * len(QWEN3_ALL)


@pytest.mark.parametrize("tuner", list(QWEN3_CONFIGS))
def test_merge_verify_and_the_runtime_agree_with_peft(tuner, qwen3, tmp_path, capsys):
    """``merge --verify`` passes, and lorafuse.runtime (the edit applied to a live model's weights) gives PEFT's
    merged model's logits."""
    from lorafuse.runtime import apply_adapter

    adapter = _make_adapter(_qwen3_model(qwen3), QWEN3_CONFIGS[tuner](), tmp_path / tuner)
    assert main(["merge", str(qwen3), str(adapter), "-o", str(tmp_path / "out"), "--verify"]) == 0, capsys.readouterr()
    model = _qwen3_model(qwen3)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    base = _logits(model, ids)
    apply_adapter(model, adapter)
    expected = _logits(PeftModel.from_pretrained(_qwen3_model(qwen3), adapter).merge_and_unload().eval(), ids)
    out = _logits(model, ids)
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_trained_biases_are_saved_and_merged(tiny_net, tmp_path):
    """bias="oft_only": PEFT saves the targeted layers' trained biases; they replace the base ones."""
    config = OFTConfig(target_modules=["lin", "conv"], oft_block_size=4, bias="oft_only", init_weights=False)
    adapter = _make_adapter(load_module(TinyNet(), tiny_net), config, tmp_path / "oft")
    assert "base_model.model.lin.base_layer.bias" in load_file(adapter / "adapter_model.safetensors")
    out = tmp_path / "merged"
    lorafuse.merge(tiny_net, [adapter], out, dtype="fp32")
    _assert_tensors_match(out, peft_merged_in_turn(load_module(TinyNet(), tiny_net), [adapter]))
    assert _changed(tiny_net, out) == {"lin.weight", "lin.bias", "conv.weight", "conv.bias"}


def test_lora_then_oft_then_hra_in_sequence_match_peft(qwen3, tmp_path):
    lora = tmp_path / "lora"
    peft_lora = get_peft_model(_qwen3_model(qwen3), LoraConfig(target_modules=QWEN3_ALL, init_lora_weights=False))
    _randomize_adapter(peft_lora, 3)
    peft_lora.save_pretrained(lora)
    oft = _make_adapter(
        _qwen3_model(qwen3),
        OFTConfig(target_modules=["q_proj", "down_proj"], oft_block_size=8, init_weights=False),
        tmp_path / "oft",
        seed=4,
    )
    hra = _make_adapter(
        _qwen3_model(qwen3),
        HRAConfig(target_modules=["q_proj", "o_proj"], r=2, init_weights=False),
        tmp_path / "hra",
        seed=5,
    )
    out = tmp_path / "merged"
    lorafuse.merge(qwen3, [lora, oft, hra], out, dtype="fp32")
    _assert_tensors_match(out, peft_merged_in_turn(_qwen3_model(qwen3), [lora, oft, hra]))
    # the order matters (a rotation does not commute with an update): the other order is another model
    other = tmp_path / "other"
    lorafuse.merge(qwen3, [oft, lora], other, dtype="fp32")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(read_tensors(other)[q], read_tensors(out)[q], atol=1e-4)
    _assert_tensors_match(other, peft_merged_in_turn(_qwen3_model(qwen3), [oft, lora]))


def test_oft_on_a_tied_embedding_gives_the_trained_model(tmp_path):
    """PEFT trains OFT on a tied embedding with the head unrotated, but its merge rotates the shared weight (the
    head too); lorafuse unties them, as for LoRA, so the merged model computes what the trained model computed."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    oft = OFTConfig(target_modules=["embed_tokens", "q_proj"], oft_block_size=8, init_weights=False)
    adapter = _make_adapter(_qwen3_model(tmp_path / "tied"), oft, tmp_path / "oft")
    lorafuse.merge(tmp_path / "tied", [adapter], tmp_path / "out", dtype="fp32")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    trained = PeftModel.from_pretrained(_qwen3_model(tmp_path / "tied"), adapter).eval()
    torch.testing.assert_close(
        _logits(_qwen3_model(tmp_path / "out"), ids), _logits(trained, ids), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("tuner", ["oft", "boft", "hra"])
def test_strength_interpolates_between_base_and_peft_merge(tuner, qwen3, tmp_path):
    adapter = _make_adapter(_qwen3_model(qwen3), QWEN3_CONFIGS[tuner](), tmp_path / tuner)
    out = tmp_path / "merged"
    lorafuse.merge(qwen3, [adapter], out, weights=[0.25], dtype="fp32")
    base = read_tensors(qwen3)
    full = peft_merged_in_turn(_qwen3_model(qwen3), [adapter])
    expected = {k: base[k] + 0.25 * (full[k] - base[k]) for k in base}
    _assert_tensors_match(out, expected)


def test_bf16_base_is_rounded_once_from_fp32(qwen3, tmp_path):
    """A bf16 base merged in fp32 and rounded once: PEFT's fp32 merge of the same bf16 values, rounded."""
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.bfloat16).save_pretrained(bf16)
    adapter = _make_adapter(_qwen3_model(bf16), QWEN3_CONFIGS["oft"](), tmp_path / "oft")
    out = tmp_path / "merged"
    lorafuse.merge(bf16, [adapter], out)
    merged = read_tensors(out)
    expected = peft_merged_in_turn(_qwen3_model(bf16), [adapter])
    for key, value in expected.items():
        got = merged[key]
        assert got.dtype == torch.bfloat16
        # one rounding of nearly the same fp32 value: equal, or one bf16 step apart where it sat on a tie
        torch.testing.assert_close(got.float(), value.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)


# --- the edits themselves --------------------------------------------------------------------------------------


def test_oft_rotations_match_peft_s_matrices(tmp_path):
    """OFT's rotation blocks, compared with PEFT's OFTRotationModule.get_weight (its merge matrix)."""
    gen = torch.Generator().manual_seed(7)
    worst = {}
    for terms, neumann, coft, share in [
        (5, True, False, False),
        (7, True, True, False),
        (0, False, False, False),
        (0, False, True, True),
        (2, True, False, True),
        (1, True, False, False),
    ]:
        size, blocks = 6, 1 if share else 4
        module = OFTRotationModule(
            blocks,
            size * (size - 1) // 2,
            size,
            24,
            coft=coft,
            eps=0.4,
            block_share=share,
            use_cayley_neumann=neumann,
            num_cayley_neumann_terms=terms,
        )
        with torch.no_grad():
            # small blocks stay inside COFT's limit, large ones are projected onto it
            rows = torch.tensor([0.05, 1.0] * 2)[: module.weight.shape[0]].reshape(-1, 1)
            module.weight.copy_(0.4 * rows * torch.randn(module.weight.shape, generator=gen))
        path = tmp_path / f"r{terms}{neumann}{coft}{share}.safetensors"
        save_file({"w": module.weight.detach().clone()}, path)
        expected = module.get_weight().detach().numpy()  # (24, 24) block diagonal; projects weight when coft
        with Checkpoint([path]) as ckpt:
            edit = OftRotation(
                TensorRef(ckpt, "w"),
                size,
                block_share=share,
                coft=coft,
                eps=0.4,
                neumann_terms=terms if neumann else None,
            )
            blocks_got = edit.rotations()
        dense = np.zeros((24, 24), dtype=np.float32)
        for i in range(24 // size):
            dense[i * size : (i + 1) * size, i * size : (i + 1) * size] = blocks_got[0 if share else i]
        worst[(terms, neumann, coft, share)] = float(np.abs(dense - expected).max())
        np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-6)
    assert max(worst.values()) < 1e-6, worst


def _rows_in_blocks(edit, base: np.ndarray, ops: BlockOps, step: int) -> np.ndarray:
    out = base.copy()
    for start in range(0, base.shape[0], step):
        rows = slice(start, min(base.shape[0], start + step))
        edit.apply(out[rows], rows, ops)
    return out


def test_row_blocks_and_torch_ops_give_the_whole_tensor_s_result(tmp_path):
    """Each edit streams: row blocks of any size give the same rows; torch's ops (the CUDA kernel's) agree."""
    from lorafuse.engine.cuda import TorchOps

    gen = np.random.default_rng(0)
    path = tmp_path / "a.safetensors"
    save_file(
        {
            "oft": torch.from_numpy(gen.normal(0, 0.3, (6, 6)).astype(np.float32)),
            "boft_R": torch.from_numpy(gen.normal(0, 0.3, (2, 6, 4, 4)).astype(np.float32)),
            "boft_s": torch.from_numpy(gen.normal(1, 0.3, (10, 1)).astype(np.float32)),
            "hra": torch.from_numpy(gen.normal(0, 1, (24, 3)).astype(np.float32)),
        },
        path,
    )
    base = gen.normal(0, 1, (10, 24)).astype(np.float32)
    with Checkpoint([path]) as ckpt:
        edits = [
            OftRotation(TensorRef(ckpt, "oft"), 4),
            BoftRotation(TensorRef(ckpt, "boft_R"), TensorRef(ckpt, "boft_s")),
            HraReflection(TensorRef(ckpt, "hra"), apply_gs=True),
            HraReflection(TensorRef(ckpt, "hra")).scaled(0.5),
        ]
        for edit in edits:
            assert edit.shape_error((10, 24)) is None
            whole = _rows_in_blocks(edit, base, BlockOps(), 10)
            assert not np.allclose(whole, base)
            np.testing.assert_allclose(_rows_in_blocks(edit, base, BlockOps(), 3), whole, rtol=0, atol=1e-6)
            torch_block = torch.from_numpy(base.copy())
            edit.apply(torch_block, slice(0, 10), TorchOps("cpu"))
            np.testing.assert_allclose(torch_block.numpy(), whole, rtol=0, atol=1e-5)


def test_orthogonal_merges_keep_row_norms(tmp_path):
    """A rotation or reflection of the inputs keeps each row's norm (BOFT then scales it by s)."""
    gen = np.random.default_rng(1)
    path = tmp_path / "a.safetensors"
    save_file({"u": torch.from_numpy(gen.normal(0, 1, (12, 5)).astype(np.float32))}, path)
    base = gen.normal(0, 1, (7, 12)).astype(np.float32)
    with Checkpoint([path]) as ckpt:
        for gs in (False, True):
            out = _rows_in_blocks(HraReflection(TensorRef(ckpt, "u"), apply_gs=gs), base, BlockOps(), 7)
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(base, axis=1), rtol=1e-5)


# --- inspect ---------------------------------------------------------------------------------------------------


def test_inspect_names_the_tuner_and_finds_untrained_adapters(tiny_net, tmp_path):
    for config, kind in [
        (OFTConfig(target_modules=["lin", "conv"], oft_block_size=4), "oft"),
        (BOFTConfig(target_modules=["lin", "conv"], boft_block_size=4), "boft"),
        (HRAConfig(target_modules=["lin", "conv"], r=4), "hra"),
    ]:
        folder = tmp_path / kind
        get_peft_model(load_module(TinyNet(), tiny_net), config).save_pretrained(folder)  # PEFT's identity init
        report = inspect_adapter(folder)
        text = json.dumps(report)
        assert f'"kind": "{kind}"' in text
        assert sorted(report["zero_effect"]) == ["conv.weight", "lin.weight"]
        out = tmp_path / f"{kind}-merged"
        merged = lorafuse.merge(tiny_net, [folder], out, dtype="fp32")
        assert merged.warnings  # an adapter that changes nothing is reported
        _assert_tensors_match(out, peft_merged_in_turn(load_module(TinyNet(), tiny_net), [folder]))


# --- refusals ----------------------------------------------------------------------------------------------------


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.fixture
def oft_adapter(tiny_net, tmp_path) -> Path:
    config = OFTConfig(target_modules=["lin", "conv"], oft_block_size=4, init_weights=False)
    return _make_adapter(load_module(TinyNet(), tiny_net), config, tmp_path / "oft")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(oft_block_size=None), "predates PEFT 0.14"),
        (dict(coft="yes"), "coft must be true or false"),
        (dict(block_share=1), "block_share must be true or false"),
        (dict(eps=float("nan")), "eps is nan"),
        (dict(num_cayley_neumann_terms=-1), "num_cayley_neumann_terms is -1"),
        (dict(r=4), "exactly one of r"),
        (dict(peft_version="0.17.1"), "Cayley-Neumann series PEFT changed in 0.18.0"),
        (dict(peft_version=None), "no peft_version, so the adapter may come from PEFT 0.16 or 0.17"),
        (dict(peft_version="main"), "peft_version 'main' is not a PEFT version"),
        (dict(block_share=True), "block_share is true"),
    ],
)
def test_bad_oft_configs_are_refused_by_name(changes, message, oft_adapter, tiny_net, tmp_path, capsys):
    _edit_config(oft_adapter, **changes)
    with pytest.raises(AdapterError, match=message):
        lorafuse.merge(tiny_net, [oft_adapter], tmp_path / "out", dtype="fp32")
    assert main(["merge", str(tiny_net), str(oft_adapter), "-o", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err.strip()
    assert message.split()[0] in err and "\n" not in err and "Traceback" not in err


def test_exact_cayley_needs_no_peft_version(oft_adapter, tiny_net, tmp_path):
    """Only the Cayley-Neumann series changed between PEFT versions; the exact transform did not."""
    _edit_config(oft_adapter, peft_version=None, use_cayley_neumann=False)
    lorafuse.merge(tiny_net, [oft_adapter], tmp_path / "out", dtype="fp32")
    _assert_tensors_match(tmp_path / "out", peft_merged_in_turn(load_module(TinyNet(), tiny_net), [oft_adapter]))


def test_old_oft_tensors_are_refused(oft_adapter, tiny_net, tmp_path):
    path = oft_adapter / "adapter_model.safetensors"
    state = load_file(path)
    state["base_model.model.lin.oft_r"] = state.pop("base_model.model.lin.oft_R.weight")
    state["base_model.model.lin.oft_s"] = torch.ones(8, 1)
    save_file(state, path)
    with pytest.raises(AdapterError, match=r"PEFT <= 0\.15\.2"):
        lorafuse.merge(tiny_net, [oft_adapter], tmp_path / "out")


def test_wrong_base_is_a_shape_error(oft_adapter, butterfly_net, tmp_path):
    with pytest.raises(ShapeMismatchError, match="OFT matrix acts on 36 inputs but each row of the base tensor has 16"):
        lorafuse.merge(butterfly_net, [oft_adapter], tmp_path / "out")


def test_hra_rank_must_match_the_config_and_vectors_must_not_vanish(tiny_net, tmp_path):
    adapter = _make_adapter(load_module(TinyNet(), tiny_net), HRAConfig(target_modules=["lin"], r=2), tmp_path / "h")
    _edit_config(adapter, r=3)
    with pytest.raises(AdapterError, match="holds 2 vectors but r is 3"):
        lorafuse.merge(tiny_net, [adapter], tmp_path / "out")
    _edit_config(adapter, r=2)
    path = adapter / "adapter_model.safetensors"
    state = load_file(path)
    state["base_model.model.lin.hra_u"][:, 1] = 0
    save_file(state, path)
    with pytest.raises(LorafuseError, match="column 1 .* is zero"):
        lorafuse.merge(tiny_net, [adapter], tmp_path / "out2")


def test_gpt2_conv1d_targets_are_refused(tmp_path):
    """PEFT's OFT/BOFT/HRA never wrap GPT-2's Conv1D: tensors that say they do are not merged as if Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(base)
    adapter = tmp_path / "hra"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "HRA", "r": 2, "target_modules": ["c_proj"]}))
    save_file(
        {"base_model.model.transformer.h.0.attn.c_proj.hra_u": torch.randn(16, 2)},
        adapter / "adapter_model.safetensors",
    )
    with pytest.raises(ShapeMismatchError, match="does not wrap GPT-2 Conv1D"):
        lorafuse.merge(base, [adapter], tmp_path / "out")
