"""Native MiSS merges (default, ``"mini"`` and ``"bat"`` layouts) compute what PEFT's ``merge_and_unload()`` does.

Same oracle as test_tuners_oft_boft_hra.py (its model builders and comparisons are reused): PEFT creates the
adapter, its blocks are randomised, PEFT and lorafuse merge it, and the tensors are compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_tuners_oft_boft_hra as oft_tests
import torch
from peft import LoraConfig, MissConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from test_tuners_oft_boft_hra import (
    QWEN3_ALL,
    _assert_tensors_match,
    _changed,
    _edit_config,
    _logits,
    _make_adapter,
    _qwen3_model,
    _randomize_adapter,
    _rows_in_blocks,
    _save_net,
)
from torch import nn
from tuner_helpers import load_module, peft_merged_in_turn

import lorafuse
from lorafuse.cli import main
from lorafuse.edits import BlockOps, TensorRef
from lorafuse.errors import AdapterError, ShapeMismatchError
from lorafuse.inspect import inspect_adapter
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.tuners.miss import MissBat, MissDelta

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
qwen3 = oft_tests.qwen3  # the tiny Qwen3 fixture


class LinearNet(nn.Module):
    """Linear layers whose inputs 16, 8 and 12 leave a remainder for r=3 (MiSS's partial last slice)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(8, 16, bias=False)
        self.c = nn.Linear(12, 12)


@pytest.fixture(scope="module")
def linear_net(tmp_path_factory) -> Path:
    return _save_net(LinearNet(), tmp_path_factory.mktemp("models") / "linear")


CASES = {
    "default": dict(r=3, init_weights=False),
    "default-r-divides": dict(r=4, init_weights=False),
    "mini": dict(r=3, mini_r=4, init_weights="mini"),
    "bat": dict(r=4, init_weights="bat"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_miss_matches_peft(case, linear_net, tmp_path):
    adapter = _make_adapter(
        load_module(LinearNet(), linear_net), MissConfig(target_modules=["a", "b", "c"], **CASES[case]), tmp_path / "m"
    )
    out = tmp_path / "merged"
    report = lorafuse.merge(linear_net, [adapter], out, dtype="fp32")
    assert report.warnings == []
    _assert_tensors_match(out, peft_merged_in_turn(load_module(LinearNet(), linear_net), [adapter]))
    assert _changed(linear_net, out) == {"a.weight", "b.weight", "c.weight"}


@pytest.mark.parametrize("init", [False, "mini", "bat"])
def test_qwen3_through_the_cli_with_a_strength(init, qwen3, tmp_path):
    config = MissConfig(target_modules=QWEN3_ALL, r=8, mini_r=8, init_weights=init)
    adapter = _make_adapter(_qwen3_model(qwen3), config, tmp_path / "miss")
    out = tmp_path / "merged"
    assert main(["merge", str(qwen3), str(adapter), "-o", str(out), "--dtype", "fp32"]) == 0
    expected = PeftModel.from_pretrained(_qwen3_model(qwen3), adapter).merge_and_unload().eval()
    _assert_tensors_match(out, {k: v.detach() for k, v in expected.state_dict().items()})
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(_qwen3_model(out), ids), _logits(expected, ids), rtol=1e-5, atol=1e-5)
    # a strength interpolates between the base and PEFT's merge
    half = tmp_path / "half"
    lorafuse.merge(qwen3, [adapter], half, weights=[0.5], dtype="fp32")
    base, full = peft_merged_in_turn(_qwen3_model(qwen3), []), {k: v.detach() for k, v in expected.state_dict().items()}
    _assert_tensors_match(half, {k: base[k] + 0.5 * (full[k] - base[k]) for k in base})


def test_lora_then_miss_and_the_runtime_match_peft(qwen3, tmp_path):
    from lorafuse.runtime import apply_adapter

    lora = tmp_path / "lora"
    peft_lora = get_peft_model(
        _qwen3_model(qwen3), LoraConfig(target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    )
    _randomize_adapter(peft_lora, 3)
    peft_lora.save_pretrained(lora)
    miss = _make_adapter(
        _qwen3_model(qwen3), MissConfig(target_modules=["q_proj", "down_proj"], r=4, init_weights="bat"), tmp_path / "b"
    )
    out = tmp_path / "merged"
    lorafuse.merge(qwen3, [lora, miss], out, dtype="fp32")
    _assert_tensors_match(out, peft_merged_in_turn(_qwen3_model(qwen3), [lora, miss]))
    model = _qwen3_model(qwen3)
    apply_adapter(model, miss)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = PeftModel.from_pretrained(_qwen3_model(qwen3), miss).merge_and_unload().eval()
    torch.testing.assert_close(_logits(model, ids), _logits(expected, ids), rtol=1e-5, atol=1e-5)


def test_inspect_reports_the_layout_and_untrained_blocks(linear_net, tmp_path):
    adapter = tmp_path / "miss"
    get_peft_model(
        load_module(LinearNet(), linear_net), MissConfig(target_modules=["a", "c"], r=4, init_weights="bat")
    ).save_pretrained(adapter)  # PEFT's "bat" init: zeros, no effect
    report = inspect_adapter(adapter)
    assert '"layout": "bat"' in json.dumps(report)
    assert sorted(report["zero_effect"]) == ["a.weight", "c.weight"]


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(init_weights="gaussian"), AdapterError, "PEFT's MiSS knows"),
        (dict(init_weights="mini", mini_r=2), AdapterError, "has 8 columns but mini_r is 2"),
        (dict(init_weights="bat"), AdapterError, r"not MiSS's \(out / r, r, r\)"),
    ],
)
def test_bad_configs_are_refused(changes, error, message, linear_net, tmp_path):
    adapter = _make_adapter(
        load_module(LinearNet(), linear_net), MissConfig(target_modules=["a"], r=4, init_weights=False), tmp_path / "m"
    )
    _edit_config(adapter, **changes)
    with pytest.raises(error, match=message):
        lorafuse.merge(linear_net, [adapter], tmp_path / "out")


def test_a_bat_block_that_does_not_divide_the_layer_is_a_shape_error(linear_net, tmp_path):
    adapter = _make_adapter(
        load_module(LinearNet(), linear_net), MissConfig(target_modules=["a"], r=4, init_weights="bat"), tmp_path / "m"
    )
    path = adapter / "adapter_model.safetensors"
    save_file({"base_model.model.a.miss_block": torch.randn(4, 3, 3)}, path)  # r=3 does not divide 16 inputs
    with pytest.raises(ShapeMismatchError, match="bat blocks of 3 do not divide the base tensor's 16 inputs"):
        lorafuse.merge(linear_net, [adapter], tmp_path / "out")


def test_row_blocks_not_aligned_to_r_and_torch_ops_agree(tmp_path):
    """A row block may start inside a bat block of r rows or a "mini" period; the CUDA kernel's ops agree."""
    from lorafuse.engine.cuda import TorchOps

    gen = np.random.default_rng(0)
    path = tmp_path / "m.safetensors"
    blocks = {
        "bat": gen.normal(0, 0.3, (3, 4, 4)),
        "mini": gen.normal(0, 0.3, (3, 4)),
        "default": gen.normal(0, 0.3, (5, 12)),
    }
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in blocks.items()}, path)
    base = gen.normal(0, 1, (12, 16)).astype(np.float32)
    with Checkpoint([path]) as ckpt:
        edits = [
            MissBat(TensorRef(ckpt, "bat")),
            MissBat(TensorRef(ckpt, "bat")).scaled(0.3),
            MissDelta(TensorRef(ckpt, "mini"), mini=True),
            MissDelta(TensorRef(ckpt, "default")).scaled(-0.5),
        ]
        for edit in edits:
            assert edit.shape_error((12, 16)) is None
            whole = _rows_in_blocks(edit, base, BlockOps(), 12)
            assert not np.allclose(whole, base)
            np.testing.assert_allclose(_rows_in_blocks(edit, base, BlockOps(), 5), whole, rtol=0, atol=1e-6)
            torch_block = torch.from_numpy(base.copy())
            edit.apply(torch_block, slice(0, 12), TorchOps("cpu"))
            np.testing.assert_allclose(torch_block.numpy(), whole, rtol=0, atol=1e-5)
