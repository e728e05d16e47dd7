"""The GGUF lorafuse writes runs in llama.cpp itself (llama-cpp-python) and its logits match transformers' on the
PEFT-merged model, within the output type's tolerance; the same for a merge into a GGUF base.

llama-cpp-python compiles llama.cpp on install (35 minutes here: two cores shared with other work, one compile job
at nice 19): these tests need it installed (``pip install llama-cpp-python``) and say so when it is not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_peft_adapter, peft_merged
from test_gguf_base import converted
from test_gguf_merge import make_model

import lorafuse

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp)")

IDS = [1, 7, 23, 5, 42, 9, 17, 3, 60, 11]
TOLERANCE = {"f32": 1e-3, "f16": 2e-2, "q8_0": 6e-2}  # relative to the largest reference logit


def llama_cpp_logits(path) -> np.ndarray:
    model = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, seed=0)
    model.eval(IDS)
    return np.asarray(model.scores[: len(IDS)], dtype=np.float32)


def transformers_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float().numpy()


@pytest.mark.parametrize(("model_type", "outtype"), [("llama", "f32"), ("qwen3", "f16"), ("llama", "q8_0")])
def test_llama_cpp_runs_the_merge_as_transformers_runs_peft_merge(model_type, outtype, tmp_path):
    extra = dict(head_dim=16) if model_type == "qwen3" else {}
    base = make_model(tmp_path / "hf", model_type, "spm", **extra)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "v_proj", "up_proj"])
    out = tmp_path / "merged.gguf"
    lorafuse.merge(base, [adapter], out, outtype=outtype)
    want = transformers_logits(peft_merged(base, [adapter]))
    got = llama_cpp_logits(out)
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= TOLERANCE[outtype] * scale
    unmerged = llama_cpp_logits(converted(base, tmp_path, outtype))
    assert np.abs(unmerged - want).max() > 4 * TOLERANCE[outtype] * scale  # the adapter shows in the logits


def test_llama_cpp_runs_a_merge_into_a_gguf_base(tmp_path):
    base = make_model(tmp_path / "hf", "llama", "spm")
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "down_proj"])
    out = tmp_path / "merged.gguf"
    lorafuse.merge(converted(base, tmp_path, "f32"), [adapter], out)
    want = transformers_logits(peft_merged(base, [adapter]))
    assert np.abs(llama_cpp_logits(out) - want).max() <= TOLERANCE["f32"] * float(np.abs(want).max())
