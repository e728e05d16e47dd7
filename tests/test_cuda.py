"""--device cuda: the same merge, extraction and verification as on CPU. Runs only where CUDA is available
(CI has no GPU; these run on a GPU machine when one is at hand)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_peft_adapter, read_tensors

import lorafuse
from lorafuse.extract import extract
from lorafuse.verify import verify

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fixture", ["llama_untied", "llama_bf16", "gpt2"])
def test_cuda_merge_equals_cpu_merge(fixture, use_dora, request, tmp_path):
    base = request.getfixturevalue(fixture)
    targets = ["c_attn", "c_proj", "wte"] if fixture == "gpt2" else ["q_proj", "down_proj", "embed_tokens"]
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=targets, use_dora=use_dora)
    lorafuse.merge(base, [adapter], tmp_path / "cpu")
    report = lorafuse.merge(base, [adapter], tmp_path / "cuda", device="cuda")
    assert report.tensors_touched > 0
    cpu, gpu = read_tensors(tmp_path / "cpu"), read_tensors(tmp_path / "cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert gpu[name].dtype == cpu[name].dtype, name
        # Same fp32 math on another device: equal up to summation order, i.e. at most one rounding step apart.
        tol = 1e-5 if cpu[name].dtype == torch.float32 else 8e-3
        torch.testing.assert_close(gpu[name].float(), cpu[name].float(), rtol=tol, atol=tol, msg=name)
    assert verify(tmp_path / "cuda", base, [adapter], device="cuda", outputs=False).passed


def test_cuda_extract_recovers_a_planted_low_rank_delta(llama_untied, tmp_path):
    adapter = make_peft_adapter(llama_untied, tmp_path / "lora", target_modules=["q_proj", "up_proj"], r=4)
    lorafuse.merge(llama_untied, [adapter], tmp_path / "tuned")
    for exact in (False, True):
        out = tmp_path / f"ex-{exact}"
        report = extract(llama_untied, tmp_path / "tuned", out, rank=6, min_params=0, device="cuda", exact_svd=exact)
        assert report.lora == 4 and report.rel_error < 1e-5
        lorafuse.merge(llama_untied, [out], tmp_path / f"again-{exact}")
        merged, tuned = read_tensors(tmp_path / f"again-{exact}"), read_tensors(tmp_path / "tuned")
        for name in tuned:
            torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=1e-5, msg=name)
