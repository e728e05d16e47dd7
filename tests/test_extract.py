"""``lorafuse extract``: round trips through ``lorafuse merge``, PEFT loading the extracted adapter, SVD quality."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import input_ids, load_model, make_peft_adapter, read_tensors
from peft import PeftModel
from safetensors.torch import load_file, save_file

import lorafuse
import lorafuse.extract as extract_module
from lorafuse.arrays import BF16, frobenius_norm
from lorafuse.blas_threads import BlasPool
from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.extract import AUTO_TOLERANCE, extract, low_rank, predicted_excess

Q = "model.layers.0.self_attn.q_proj.weight"


def make_tuned(base: Path, dest: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of ``base`` whose tensors ``change`` edits in place."""
    shutil.copytree(base, dest)
    tensors = load_file(dest / "model.safetensors")
    change(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def noise(shape, seed: int, scale: float = 0.01) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def full_rank_change(tensors: dict[str, torch.Tensor]) -> None:
    for i, name in enumerate(sorted(tensors)):
        if name.endswith(("q_proj.weight", "down_proj.weight", "input_layernorm.weight")):
            tensors[name] = tensors[name] + noise(tensors[name].shape, i)


@pytest.mark.parametrize("fmt", ["peft", "diffusion", "kohya"])
def test_diff_only_round_trip_is_bit_exact(llama_untied, tmp_path, fmt):
    tuned = make_tuned(llama_untied, tmp_path / "tuned", full_rank_change)
    out = tmp_path / ("adapter" if fmt == "peft" else "adapter.safetensors")
    report = extract(llama_untied, tuned, out, fmt=fmt, diff_only=True)
    assert (report.direct_diff, report.lora, report.failed) == (6, 0, 0)
    assert report.rel_error == 0.0
    lorafuse.merge(llama_untied, [out], tmp_path / "merged")
    merged, want = read_tensors(tmp_path / "merged"), read_tensors(tuned)
    assert merged.keys() == want.keys()
    for name in want:
        assert torch.equal(merged[name], want[name]), name


def planted_change(tensors: dict[str, torch.Tensor]) -> None:
    """Rank-2 changes of two weights and a changed norm (a modules_to_save entry)."""
    for i, name in enumerate((Q, "model.layers.1.mlp.down_proj.weight")):
        out, inp = tensors[name].shape
        tensors[name] = tensors[name] + noise((out, 2), 10 + i, 0.3) @ noise((2, inp), 20 + i, 0.3)
    tensors["model.layers.0.input_layernorm.weight"] += noise((32,), 30, 0.1)


def test_extract_runs_without_torch(llama_untied, tmp_path):
    """torch is an extra: `lorafuse extract` (randomized and exact SVD, bf16 rounding) runs where it is missing, and
    PEFT loads what it wrote; a .pt output and --device cuda say which extra they need, in one line."""
    tuned = make_tuned(llama_untied, tmp_path / "tuned", planted_change)
    base, out = str(llama_untied), str(tmp_path)
    script = (
        "import sys; sys.modules['torch'] = None\n"  # import torch now fails
        "from lorafuse.cli import main\n"
        f"base, tuned, out = {base!r}, {str(tuned)!r}, {out!r}\n"
        "args = ['extract', base, tuned, '--rank', '2', '--keep-full', '*input_layernorm']\n"
        "assert main([*args, '-o', out + '/ex']) == 0\n"
        "kohya = ['--format', 'kohya', '--min-params', '0', '--exact-svd', '--dtype', 'bf16']\n"
        "assert main([*args, '-o', out + '/k', *kohya]) == 0\n"
        "assert main([*args, '-o', out + '/p.pt', '--format', 'kohya']) == 1\n"
        "assert main([*args, '-o', out + '/c', '--device', 'cuda']) == 1\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("lorafuse: error:")]
    assert len(refusals) == 2 and all("pip install 'lorafuse[torch]'" in line for line in refusals), proc.stderr
    assert "a .pt output" in refusals[0] and "--device cuda" in refusals[1]
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "c").exists()

    report = json.loads((tmp_path / "ex" / "lorafuse_extract.json").read_text())
    assert (report["lora"], report["direct_diff"]) == (2, 1) and report["rel_error"] < 1e-5
    ids = input_ids()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_model(llama_untied), tmp_path / "ex")(ids).logits
        tuned_logits = load_model(tuned)(ids).logits
    torch.testing.assert_close(peft_logits, tuned_logits, rtol=0, atol=1e-4)
    kohya = load_file(tmp_path / "k.safetensors")
    assert {t.dtype for t in kohya.values() if t.dim()} == {torch.bfloat16}
    flat = "lora_unet_model_layers_0_self_attn_q_proj"
    delta = read_tensors(tuned)[Q] - read_tensors(llama_untied)[Q]
    approx = kohya[f"{flat}.lora_up.weight"].float() @ kohya[f"{flat}.lora_down.weight"].float()
    assert float((approx - delta).norm() / delta.norm()) < 1e-2  # rank-2 change, factors rounded to bf16


def test_planted_low_rank_delta_round_trips_and_peft_loads_it(llama_untied, tmp_path):
    adapter = make_peft_adapter(llama_untied, tmp_path / "lora", target_modules=["q_proj", "v_proj", "up_proj"], r=4)
    lorafuse.merge(llama_untied, [adapter], tmp_path / "tuned")
    report = extract(llama_untied, tmp_path / "tuned", tmp_path / "ex", rank=6)
    assert (report.lora, report.direct_diff, report.similar) == (6, 0, 15)
    assert report.rel_error < 1e-5
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6
    assert sorted(config["target_modules"]) == ["q_proj", "up_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(llama_untied)
    # Only what changed is stored: 6 modules x (A, B).
    assert len(load_file(tmp_path / "ex" / "adapter_model.safetensors")) == 12

    lorafuse.merge(llama_untied, [tmp_path / "ex"], tmp_path / "again")
    merged, tuned = read_tensors(tmp_path / "again"), read_tensors(tmp_path / "tuned")
    for name in tuned:
        torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=1e-5)

    ids = input_ids()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_model(llama_untied), tmp_path / "ex")(ids).logits
        tuned_logits = load_model(tmp_path / "tuned")(ids).logits
    torch.testing.assert_close(peft_logits, tuned_logits, rtol=0, atol=1e-4)


def qwen2_full_rank_and_bias_change(tensors):
    full_rank_change(tensors)
    name = "model.layers.1.self_attn.q_proj.bias"
    tensors[name] = tensors[name] + noise(tensors[name].shape, 99, 0.1)


def test_truncated_extraction_leaves_out_what_a_lora_cannot_hold(qwen2, tmp_path):
    """Full-rank changes at rank 2, changed norms and a changed q_proj bias: in PEFT format the norms and the bias
    (down_proj has no bias, so PEFT could not merge a lora_bias) are left out and reported with their share."""
    tuned = make_tuned(qwen2, tmp_path / "tuned", qwen2_full_rank_and_bias_change)
    report = extract(qwen2, tuned, tmp_path / "ex", rank=2)
    assert (report.lora, report.direct_diff, report.left_out, report.processed) == (4, 0, 3, 7)
    left = {t.name: t for t in report.tensors if t.kind == "left_out"}
    assert sorted(left) == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.bias",
    ]
    assert "1-D" in left["model.layers.0.input_layernorm.weight"].note
    assert "lora_bias" in left["model.layers.1.self_attn.q_proj.bias"].note
    tuned_tensors, base_tensors = read_tensors(tuned), read_tensors(qwen2)
    deltas = {n: (tuned_tensors[n] - base_tensors[n]).double().norm() ** 2 for n in tuned_tensors}
    total = sum(deltas.values())
    for name, result in left.items():  # the share of ||delta||^2, measured here from the two models
        assert result.share == pytest.approx(float(deltas[name] / total), rel=1e-6)
        assert result.rel_error == 1.0
    assert report.left_out_error == pytest.approx(math.sqrt(sum(float(deltas[n] / total) for n in left)), rel=1e-6)
    assert report.left_out_error < report.rel_error < 1
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["lora_bias"] is False and config["modules_to_save"] is None
    assert config["target_modules"] == ["down_proj", "q_proj"]

    ids = input_ids()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_model(qwen2), tmp_path / "ex")(ids).logits
    lorafuse.merge(qwen2, [tmp_path / "ex"], tmp_path / "merged")
    merged = read_tensors(tmp_path / "merged")
    for name in left:  # left out: the base's values
        assert torch.equal(merged[name], base_tensors[name])
    with torch.no_grad():
        merged_logits = load_model(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, rtol=0, atol=1e-4)  # PEFT reads what we meant


def test_keep_full_stores_modules_whole_and_the_truncation_error_is_reported(qwen2, tmp_path):
    """--keep-full: the norms and the q_proj bias become modules_to_save (q_proj stored whole, its LoRA dropped)."""
    tuned = make_tuned(qwen2, tmp_path / "tuned", qwen2_full_rank_and_bias_change)
    keep = ["*input_layernorm", "model.layers.1.self_attn.q_proj.bias", "*no_such_module*"]
    report = extract(qwen2, tuned, tmp_path / "ex", rank=2, keep_full=keep)
    assert report.lora == 3 and report.direct_diff == 4 and report.left_out == 0  # 2 norms, the bias and its weight
    assert report.warnings == ["--keep-full '*no_such_module*' matched no changed tensor"]
    assert 0.05 < report.rel_error < 1  # a truncation really happened, and it is reported
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["lora_bias"] is False
    assert config["modules_to_save"] == [
        "model.layers.0.input_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.self_attn.q_proj",
    ]

    ids = input_ids()
    with torch.no_grad():
        base_logits = load_model(qwen2)(ids).logits
        tuned_logits = load_model(tuned)(ids).logits
        peft_logits = PeftModel.from_pretrained(load_model(qwen2), tmp_path / "ex")(ids).logits
    lorafuse.merge(qwen2, [tmp_path / "ex"], tmp_path / "merged")
    with torch.no_grad():
        merged_logits = load_model(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, rtol=0, atol=1e-4)  # PEFT reads what we meant
    change_norm = (tuned_logits - base_logits).norm()
    miss = (peft_logits - tuned_logits).norm()
    assert miss < 3 * report.rel_error * change_norm
    # At rank 64 (>= min(out, in) of every delta here) the extraction is exact.
    full = extract(qwen2, tuned, tmp_path / "full", rank=64, keep_full=keep[:2])
    assert full.rel_error < 1e-5
    with torch.no_grad():
        full_logits = PeftModel.from_pretrained(load_model(qwen2), tmp_path / "full")(ids).logits
    torch.testing.assert_close(full_logits, tuned_logits, rtol=0, atol=1e-4)


def test_dynamic_rank_by_energy_writes_rank_pattern(llama_untied, tmp_path):
    g = torch.Generator().manual_seed(3)

    def change(tensors):
        for name, rank in ((Q, 1), ("model.layers.1.self_attn.q_proj.weight", 3)):
            out, inp = tensors[name].shape
            tensors[name] = tensors[name] + torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)

    tuned = make_tuned(llama_untied, tmp_path / "tuned", change)
    report = extract(llama_untied, tuned, tmp_path / "ex", rank=8, energy=0.9999)
    ranks = {t.name: t.rank for t in report.tensors if t.kind == "lora"}
    assert ranks == {Q: 1, "model.layers.1.self_attn.q_proj.weight": 3}
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert {config["r"], *config["rank_pattern"].values()} == {1, 3}
    ids = input_ids()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_model(llama_untied), tmp_path / "ex")(ids).logits
        tuned_logits = load_model(tuned)(ids).logits
    torch.testing.assert_close(peft_logits, tuned_logits, rtol=0, atol=1e-4)


def orthonormal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols), dtype=np.float32)).Q


def test_randomized_svd_is_within_one_percent_of_optimal():
    rng = np.random.default_rng(0)
    u, v = orthonormal(300, 120, rng), orthonormal(200, 120, rng)
    spectrum = 1.0 / np.arange(1, 121, dtype=np.float32) ** 0.5  # slowly decaying: the hard case
    matrix = (u * spectrum) @ v.T
    optimal = np.linalg.norm(spectrum[16:])
    for exact in (False, True):
        f = low_rank(matrix, 16, exact=exact, seed=1)
        err = np.linalg.norm(matrix - f.up @ f.down)
        assert f.up.shape == (300, 16) and f.down.shape == (16, 200)
        assert f.up.dtype == f.down.dtype == np.float32
        assert err <= 1.01 * optimal


def planted_bf16_delta(m: int, n: int, r: int, seed: int = 0) -> np.ndarray:
    """tuned - base for a bf16 base plus a rank-``r`` change, the sum rounded to bf16 (a merged LoRA)."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((m, n), dtype=np.float32) * 0.02).astype(BF16).astype(np.float32)
    change = (rng.standard_normal((m, r), dtype=np.float32) * 0.02) @ (
        rng.standard_normal((r, n), dtype=np.float32) / np.float32(n**0.5)
    )
    return (base + change).astype(BF16).astype(np.float32) - base


def optimal_error(matrix: np.ndarray, rank: int) -> float:
    return float(np.linalg.norm(np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[rank:]))  # Eckart-Young


def residual(matrix: np.ndarray, f) -> float:
    return float(np.linalg.norm(matrix - f.up @ f.down))


def test_auto_power_iterations_stop_early_on_a_planted_low_rank_delta():
    delta = planted_bf16_delta(512, 256, 8)
    auto = low_rank(delta, 8, seed=1)  # the bf16 rounding noise is far below the planted singular values
    assert auto.passes == 3  # sketch, B = Q^T A, then A P: half a power iteration
    assert low_rank(delta, 8, seed=1, power_iters=2).passes == 6
    assert residual(delta, auto) <= 1.01 * optimal_error(delta, 8)
    # A higher rank must also pick the best noise directions, among a flat spectrum: auto iterates.
    higher = low_rank(delta, 12, seed=1)
    assert higher.passes > 3
    assert residual(delta, higher) <= 1.01 * optimal_error(delta, 12)
    # No power iteration at all is far from optimal even here: the noise tail leaks into the sketch.
    plain = low_rank(delta, 8, seed=1, power_iters=0)
    assert plain.passes == 2
    assert residual(delta, plain) > 1.1 * optimal_error(delta, 8)


def test_auto_power_iterations_reach_one_percent_of_optimal_on_a_slowly_decaying_spectrum():
    rng = np.random.default_rng(0)
    u, v = orthonormal(512, 256, rng), orthonormal(256, 256, rng)
    matrix = (u / np.arange(1, 257, dtype=np.float32) ** 0.5) @ v.T
    optimal = optimal_error(matrix, 16)
    assert residual(matrix, low_rank(matrix, 16, power_iters=0)) > 1.05 * optimal
    for seed in range(3):
        f = low_rank(matrix, 16, seed=seed)
        assert f.passes == 6  # no gap: auto runs the most iterations it allows
        assert residual(matrix, f) <= 1.01 * optimal


def test_the_sketch_is_seeded():
    delta = planted_bf16_delta(256, 128, 4)
    a, b, c = (low_rank(delta, 4, seed=seed, power_iters=0) for seed in (5, 5, 6))
    assert np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down)
    assert not np.array_equal(a.up, c.up)


def test_predicted_excess_follows_the_spectral_gap():
    gap = np.array([10.0] * 4 + [0.01] * 4)
    flat = np.ones(8)
    assert predicted_excess(gap, 4, 4, 1) == pytest.approx(4 / 3)  # no power iteration: k / (p - 1), any spectrum
    assert predicted_excess(gap, 4, 4, 2) == pytest.approx(4 * 1e-6 * (1 - 1e-6) / 3)
    assert predicted_excess(flat, 4, 4, 5) > AUTO_TOLERANCE
    assert predicted_excess(gap, 4, 1, 3) == math.inf  # too little oversampling to judge


@pytest.mark.parametrize(("value", "passes"), [("0", {2}), ("2", {6}), ("auto", {3, 4, 5, 6})])
def test_cli_power_iters(llama_untied, tmp_path, capsys, value, passes):
    tuned = make_tuned(llama_untied, tmp_path / "tuned", full_rank_change)
    args = ["extract", str(llama_untied), str(tuned), "-o", str(tmp_path / "ex"), "--rank", "4", "--min-params", "0"]
    assert main([*args, "--power-iters", value, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["passes"] for t in data["tensors"] if t["kind"] == "lora"} <= passes


def test_cli_refuses_a_bad_power_iters(llama_untied, tmp_path):
    args = ["extract", str(llama_untied), str(llama_untied), "-o", str(tmp_path / "ex"), "--power-iters", "-1"]
    with pytest.raises(SystemExit):
        main(args)
    with pytest.raises(LorafuseError, match="power-iters"):
        extract(llama_untied, llama_untied, tmp_path / "ex", power_iters="often")


def test_frobenius_norm_is_accurate_where_an_fp32_sum_is_not():
    x = np.random.default_rng(0).standard_normal(3_000_001, dtype=np.float32) * np.float32(0.01) + np.float32(0.004)
    exact = math.sqrt(float(np.dot(x.astype(np.float64), x.astype(np.float64))))
    assert frobenius_norm(x) == pytest.approx(exact, rel=1e-9)
    assert frobenius_norm(x[:6].reshape(2, 3)) == pytest.approx(float(np.linalg.norm(x[:6].astype(np.float64))))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_element_wise_work_split_over_threads_gives_the_same_values(threads, monkeypatch):
    """The difference and the residual of the factors, computed in spans side by side (one per free CPU)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1000, 2500), dtype=np.float32).astype(BF16)
    tuned = (base.astype(np.float32) + rng.standard_normal(base.shape, dtype=np.float32) * 0.01).astype(BF16)
    want = tuned.astype(np.float64) - base.astype(np.float64)
    left, right = rng.standard_normal((1000, 4), dtype=np.float32), rng.standard_normal((4, 2500), dtype=np.float32)
    pool = BlasPool()
    monkeypatch.setattr(pool, "cap", threads)
    monkeypatch.setattr(pool, "threads_now", lambda: threads)
    one_thread = BlasPool()
    monkeypatch.setattr(one_thread, "threads_now", lambda: 1)
    workspace = extract_module._Workspace(pool)
    try:
        delta, sq_norm = workspace.difference(tuned, base)
        assert np.array_equal(delta, want.astype(np.float32))  # exact: two bf16 values of similar size
        assert sq_norm == pytest.approx(float(np.square(want).sum()), rel=1e-7)
        residual = extract_module._residual_sq(delta, left, right, workspace)
        exact = np.square(want - left.astype(np.float64) @ right.astype(np.float64)).sum()
        assert residual == pytest.approx(float(exact), rel=1e-5)
        with pool.one_thread():  # as extract runs it: numpy's BLAS pinned, the products split over threads
            split = [low_rank(m, 4, seed=3, threads=pool) for m in (delta, delta.T)]
    finally:
        pool.close()
    with BlasPool().one_thread():
        whole = [low_rank(m, 4, seed=3, threads=one_thread) for m in (delta, delta.T)]
    for f, g in zip(split, whole):  # the same bits whatever the number of threads (spans of rows or columns)
        assert np.array_equal(f.up, g.up) and np.array_equal(f.down, g.down) and f.passes == g.passes


def test_chunked_comparison_gives_the_same_adapter(llama_untied, tmp_path, monkeypatch):
    """Tensors above COMPARE_CHUNK are compared in chunks and read again: the same result as reading them whole."""
    tuned = make_tuned(llama_untied, tmp_path / "tuned", full_rank_change)
    whole = extract(llama_untied, tuned, tmp_path / "whole.safetensors", fmt="diffusion", rank=4, min_params=0)
    monkeypatch.setattr(extract_module, "COMPARE_CHUNK", 256)
    monkeypatch.setattr(extract_module, "FIRST_CHUNK", 64)
    extract_module._compare_buffers.cache_clear()
    try:
        chunked = extract(llama_untied, tuned, tmp_path / "chunked.safetensors", fmt="diffusion", rank=4, min_params=0)
    finally:
        extract_module._compare_buffers.cache_clear()
    assert (chunked.lora, chunked.direct_diff, chunked.similar) == (whole.lora, whole.direct_diff, whole.similar)
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "chunked.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_unchanged_tied_and_mismatched_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 16, generator=g)
    base = {"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(), "x.weight": torch.randn(8, 8, generator=g)}
    base["x.bias"] = torch.randn(8, generator=g)
    base["y.weight"] = torch.randn(4, 4, generator=g)
    tuned = {k: v.clone() for k, v in base.items()}
    step = torch.randn(64, 16, generator=g)
    tuned["model.embed_tokens.weight"] += step
    tuned["lm_head.weight"] += step  # still tied
    tuned["y.weight"] = torch.randn(4, 5, generator=g)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "d", fmt="diffusion")
    assert report.output == str(tmp_path / "d.safetensors")
    assert (report.direct_diff, report.tied, report.similar, report.skipped) == (1, 1, 2, 1)
    assert list(load_file(tmp_path / "d.safetensors")) == ["diffusion_model.model.embed_tokens.diff"]
    assert any("y.weight" in w for w in report.warnings)


def test_conv_weights_extract_as_conv_lora(conv_net, tmp_path):
    def change(tensors):
        out, inp, kh, kw = tensors["conv1.weight"].shape
        low = noise((out, 2), 5, 0.3) @ noise((2, inp * kh * kw), 6, 0.3)
        tensors["conv1.weight"] = tensors["conv1.weight"] + low.reshape(out, inp, kh, kw)

    tuned = make_tuned(conv_net, tmp_path / "tuned", change)
    for fmt in ("peft", "kohya"):
        out = tmp_path / f"ex-{fmt}"
        report = extract(conv_net, tuned, out, rank=2, min_params=0, fmt=fmt)
        assert report.lora == 1 and report.rel_error < 1e-5
        lorafuse.merge(conv_net, [out if fmt == "peft" else out.with_suffix(".safetensors")], tmp_path / f"m-{fmt}")
        merged, want = read_tensors(tmp_path / f"m-{fmt}"), read_tensors(tuned)
        torch.testing.assert_close(merged["conv1.weight"], want["conv1.weight"], rtol=0, atol=1e-5)


def test_cli_prints_statistics_and_refuses_existing_output(llama_untied, tmp_path, capsys):
    tuned = make_tuned(llama_untied, tmp_path / "tuned", full_rank_change)
    args = ["extract", str(llama_untied), str(tuned), "-o", str(tmp_path / "ex"), "--rank", "4", "--min-params", "0"]
    assert main(args + ["--exact-svd"]) == 0
    out = capsys.readouterr().out
    for line in ("Processed weights: 6", "Direct diff: 0", "LoRA decomposition: 4", "Similar weights: 15"):
        assert line in out
    assert "Left out (changed, not in the adapter): 2 tensors" in out
    assert "    model.layers.0.input_layernorm.weight: " in out and "--keep-full NAME" in out
    assert "Relative Frobenius error" in out
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lora"] == 4 and len(data["tensors"]) == 21
    with pytest.raises(LorafuseError, match="energy"):
        extract(llama_untied, tuned, tmp_path / "e2", energy=1.5)


def test_changed_bias_of_lora_layers_becomes_lora_bias(qwen2, tmp_path):
    def change(tensors):
        for i in range(2):
            name = f"model.layers.{i}.self_attn.q_proj"
            tensors[name + ".weight"] += noise(tensors[name + ".weight"].shape, i, 0.05)
        tensors["model.layers.1.self_attn.q_proj.bias"] += noise((32,), 7, 0.1)

    tuned = make_tuned(qwen2, tmp_path / "tuned", change)
    report = extract(qwen2, tuned, tmp_path / "ex", rank=32)
    assert (report.lora, report.direct_diff) == (2, 1) and report.rel_error < 1e-5
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["modules_to_save"] is None
    ids = input_ids()
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(load_model(qwen2), tmp_path / "ex")
        peft_logits = peft_model(ids).logits
        merged_logits = peft_model.merge_and_unload()(ids).logits  # PEFT can merge it too
        tuned_logits = load_model(tuned)(ids).logits
    torch.testing.assert_close(peft_logits, tuned_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(merged_logits, tuned_logits, rtol=0, atol=1e-4)


def test_embedding_change_extracts_as_peft_embedding_lora(llama_untied, tmp_path):
    def change(tensors):
        name = "model.embed_tokens.weight"
        tensors[name] = tensors[name] + noise((128, 2), 1, 0.3) @ noise((2, 32), 2, 0.3)

    tuned = make_tuned(llama_untied, tmp_path / "tuned", change)
    report = extract(llama_untied, tuned, tmp_path / "ex", rank=2)
    assert report.lora == 1 and report.rel_error < 1e-5
    stored = load_file(tmp_path / "ex" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in stored.items()} == {
        "base_model.model.model.embed_tokens.lora_embedding_A": (2, 128),
        "base_model.model.model.embed_tokens.lora_embedding_B": (32, 2),
    }
    ids = input_ids()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_model(llama_untied), tmp_path / "ex")(ids).logits
        tuned_logits = load_model(tuned)(ids).logits
    torch.testing.assert_close(peft_logits, tuned_logits, rtol=0, atol=1e-4)


def test_peft_format_refuses_a_change_it_cannot_hold_exactly(tmp_path):
    base = {"blocks.0.modulation": torch.zeros(1, 6, 8), "blocks.0.attn.q.weight": torch.zeros(8, 8)}
    tuned = {"blocks.0.modulation": torch.ones(1, 6, 8), "blocks.0.attn.q.weight": torch.zeros(8, 8)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    with pytest.raises(LorafuseError, match="every change was left out.*blocks.0.modulation.*--format diffusion"):
        extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "ex")
    with pytest.raises(LorafuseError, match="blocks.0.modulation.*sub-modules.*--format diffusion"):
        extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "ex", keep_full=["*"])
    assert not (tmp_path / "ex").exists()
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "ex", fmt="diffusion")
    assert report.direct_diff == 1 and (tmp_path / "ex.safetensors").is_file()


def test_gpt2_conv1d_layers_extract_with_fan_in_fan_out(gpt2, tmp_path):
    """GPT-2 stores Conv1D weights as (in, out): the PEFT adapter needs fan_in_fan_out and transposed factors."""
    adapter = make_peft_adapter(gpt2, tmp_path / "lora", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    lorafuse.merge(gpt2, [adapter], tmp_path / "tuned")
    report = extract(gpt2, tmp_path / "tuned", tmp_path / "ex", rank=4)
    assert (report.lora, report.direct_diff, report.failed) == (4, 0, 0)
    assert report.rel_error < 1e-5
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    factors = load_file(tmp_path / "ex" / "adapter_model.safetensors")
    # c_attn.weight is (32, 96): PEFT's lora_A is (r, in=32) and lora_B (out=96, r).
    assert factors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert factors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)

    ids = input_ids()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_model(gpt2), tmp_path / "ex")(ids).logits
        tuned_logits = load_model(tmp_path / "tuned")(ids).logits
    torch.testing.assert_close(peft_logits, tuned_logits, rtol=0, atol=1e-4)
    lorafuse.merge(gpt2, [tmp_path / "ex"], tmp_path / "again")
    merged, tuned = read_tensors(tmp_path / "again"), read_tensors(tmp_path / "tuned")
    for name in tuned:
        torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=1e-5)


def test_gpt2_linear_and_conv1d_changes_cannot_share_one_peft_adapter(gpt2, tmp_path):
    """fan_in_fan_out is one flag per adapter: a changed Linear head beside changed Conv1D layers is refused."""
    base = tmp_path / "base"
    shutil.copytree(gpt2, base)
    tensors = load_file(base / "model.safetensors")
    tensors["score.weight"] = noise((3, 32), 5)  # a classification head: nn.Linear, weight (out, in)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})

    def change(tensors):
        for name in ("transformer.h.0.attn.c_attn.weight", "score.weight"):
            tensors[name] = tensors[name] + noise(tensors[name].shape, 7)

    tuned = make_tuned(base, tmp_path / "tuned", change)
    with pytest.raises(LorafuseError, match="score.*Linear.*c_attn.*Conv1D.*--format diffusion"):
        extract(base, tuned, tmp_path / "ex", rank=2, min_params=0)
    assert not (tmp_path / "ex").exists()
    report = extract(base, tuned, tmp_path / "ex.safetensors", rank=2, min_params=0, fmt="diffusion")
    assert report.lora == 2


PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def low_rank_projection_change(tensors: dict[str, torch.Tensor], rank: int = 3) -> None:
    """A rank-``rank`` change of every projection weight (what a merged LoRA of that rank leaves)."""
    for i, name in enumerate(sorted(tensors)):
        if name.endswith("_proj.weight"):
            out, inp = tensors[name].shape
            tensors[name] = tensors[name] + noise((out, rank), 100 + i, 0.2) @ noise((rank, inp), 200 + i, 0.2)


def norm_change(tensors: dict[str, torch.Tensor]) -> None:
    for i, name in enumerate(sorted(tensors)):
        if name.endswith("norm.weight"):
            tensors[name] = tensors[name] + noise(tensors[name].shape, 300 + i, 0.05)


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(load_model(base), adapter)(input_ids()).logits


def model_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder)(input_ids()).logits


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_every_changed_projection_is_a_lora_whatever_its_size(tmp_path, model_type):
    """The issue's case: every weight below 1M parameters, `--rank 8` and no other flag. PEFT 0.21 loads the
    adapter (target_modules = every projection), the norms a LoRA cannot hold are left out and reported, and
    --keep-full '*norm' carries them as modules_to_save."""
    from helpers import make_llama

    base = make_llama(tmp_path / "models", model_type=model_type, hidden_size=64)
    assert max(t.numel() for t in read_tensors(base).values()) < 1_000_000
    linear = make_tuned(base, tmp_path / "linear", low_rank_projection_change)
    tuned = make_tuned(linear, tmp_path / "tuned", norm_change)
    norms = sorted(n for n in read_tensors(base) if n.endswith("norm.weight") and n.startswith("model.layers."))
    norms.append("model.norm.weight")

    report = extract(base, tuned, tmp_path / "ex", rank=8)
    assert (report.lora, report.direct_diff, report.left_out) == (14, 0, len(norms))
    assert sorted(t.name for t in report.tensors if t.kind == "left_out") == sorted(norms)
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["target_modules"] == PROJECTIONS and config["modules_to_save"] is None and config["r"] == 8
    # PEFT loads it, and its outputs are the model with the projections changed and the norms left out.
    torch.testing.assert_close(peft_logits(base, tmp_path / "ex"), model_logits(linear), rtol=0, atol=1e-4)

    kept = extract(base, tuned, tmp_path / "kept", rank=8, keep_full=["*norm"])
    assert (kept.lora, kept.direct_diff, kept.left_out) == (14, len(norms), 0) and kept.rel_error < 1e-5
    config = json.loads((tmp_path / "kept" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == sorted(n.removesuffix(".weight") for n in norms)
    torch.testing.assert_close(peft_logits(base, tmp_path / "kept"), model_logits(tuned), rtol=0, atol=1e-4)


def test_rank_truncation_error_bounds_peft_outputs(tmp_path):
    """Full-rank changes of every projection at rank 8: PEFT's outputs miss the tuned model's by about the
    reported relative error of the factors."""
    from helpers import make_llama

    base = make_llama(tmp_path / "models", model_type="qwen3", hidden_size=64)

    def change(tensors):
        for i, name in enumerate(sorted(tensors)):
            if name.endswith("_proj.weight"):
                tensors[name] = tensors[name] + noise(tensors[name].shape, 400 + i, 0.02)

    tuned = make_tuned(base, tmp_path / "tuned", change)
    report = extract(base, tuned, tmp_path / "ex", rank=8)
    assert report.lora == 14 and report.left_out == 0 and 0.3 < report.rel_error < 1
    base_logits, tuned_logits = model_logits(base), model_logits(tuned)
    miss = (peft_logits(base, tmp_path / "ex") - tuned_logits).norm()
    assert miss < 2 * report.rel_error * (tuned_logits - base_logits).norm()


def test_a_tied_embedding_change_is_left_out_with_the_reason(llama_tied, tmp_path):
    """PEFT's (and vLLM's) embedding LoRA changes the input side only, while a tied head changes with it."""

    def change(tensors):
        tensors["model.embed_tokens.weight"] += noise((128, 2), 1, 0.3) @ noise((2, 32), 2, 0.3)
        low_rank_projection_change(tensors)

    tuned = make_tuned(llama_tied, tmp_path / "tuned", change)
    report = extract(llama_tied, tuned, tmp_path / "ex", rank=4)
    left = [t for t in report.tensors if t.kind == "left_out"]
    assert [t.name for t in left] == ["model.embed_tokens.weight"] and "tied to the output head" in left[0].note
    assert report.lora == 14


def serving_change(tensors: dict[str, torch.Tensor]) -> None:
    """Projections, their biases (Qwen2), norms, the embedding and the head all changed."""
    low_rank_projection_change(tensors)
    norm_change(tensors)
    for i, name in enumerate(sorted(tensors)):
        if name.endswith("_proj.bias"):
            tensors[name] = tensors[name] + noise(tensors[name].shape, 500 + i, 0.1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows, cols = tensors[name].shape
        tensors[name] = tensors[name] + noise((rows, 2), 600, 0.3) @ noise((2, cols), 601, 0.3)


@pytest.mark.parametrize("fixture", ["qwen2", "llama_untied"])
def test_serving_vllm_writes_what_vllm_loads(fixture, tmp_path, capsys, request):
    """vLLM 0.33.0: no modules_to_save, no lora_bias, and LoRAs only on the modules the architecture takes
    (Qwen2 declares no embedding modules, Llama takes embed_tokens and lm_head). What is left out is reported with
    the error it costs, and the written adapter passes vLLM's rules; PEFT loads it too."""
    base = request.getfixturevalue(fixture)
    tuned = make_tuned(base, tmp_path / "tuned", serving_change)
    out = tmp_path / "ex"
    args = ["extract", str(base), str(tuned), "-o", str(out), "--rank", "8", "--serving", "vllm"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "vllm 0.33.0: servable as is" in text and "Left out (changed, not in the adapter)" in text
    report = json.loads((out / "lorafuse_extract.json").read_text())
    assert report["serving"]["servable"] is True
    left = {t["name"]: t["note"] for t in report["tensors"] if t["kind"] == "left_out"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["lora_bias"] is False and config["r"] <= 16
    stored = load_file(out / "adapter_model.safetensors")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")) for k in stored)
    if fixture == "qwen2":
        assert "vLLM 0.33.0 has no LoRA for embed_tokens" in left["model.embed_tokens.weight"]
        assert "vLLM 0.33.0 has no LoRA for lm_head" in left["lm_head.weight"]
        assert "refuses lora_bias" in left["model.layers.0.self_attn.q_proj.bias"]
        assert config["target_modules"] == PROJECTIONS
    else:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in stored
        assert "base_model.model.lm_head.lora_A.weight" in stored
        assert sorted(config["target_modules"]) == sorted([*PROJECTIONS, "embed_tokens", "lm_head"])
    assert all("refuses modules_to_save" in left[n] for n in left if n.endswith("norm.weight"))
    shares = sum(t["share"] for t in report["tensors"] if t["kind"] == "left_out")
    assert report["left_out_error"] == pytest.approx(math.sqrt(shares)) and report["left_out_error"] > 0
    lorafuse.merge(base, [out], tmp_path / "merged")
    torch.testing.assert_close(peft_logits(base, out), model_logits(tmp_path / "merged"), rtol=0, atol=1e-4)


def test_serving_vllm_refusals(llama_untied, gpt2, tmp_path):
    tuned = make_tuned(llama_untied, tmp_path / "tuned", low_rank_projection_change)
    out = tmp_path / "ex"
    cases = [
        ({"rank": 32}, "--rank 32 is above --max-lora-rank 16"),
        ({"max_lora_rank": 12}, "--max-lora-rank 12: vLLM 0.33.0 accepts only 1, 8, 16, 32"),
        ({"fmt": "kohya"}, "--serving vllm writes a PEFT adapter"),
        ({"keep_full": ["*norm"]}, "--keep-full stores modules_to_save, which vLLM 0.33.0 refuses"),
        ({"diff_only": True}, "--diff-only stores modules_to_save"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LorafuseError, match=message):
            extract(llama_untied, tuned, out, **{"serving": "vllm", **kwargs})
    # A rank above vLLM's default is fine once the server's --max-lora-rank is given.
    report = extract(llama_untied, tuned, out, rank=32, serving="vllm", max_lora_rank=32)
    assert report.serving["servable"] is True
    with pytest.raises(LorafuseError, match="architecture GPT2LMHeadModel: lorafuse holds vLLM 0.33.0's"):
        extract(gpt2, gpt2, tmp_path / "g", serving="vllm")
    with pytest.raises(LorafuseError, match="--min-params 5 applies to --format diffusion/kohya only"):
        extract(llama_untied, tuned, tmp_path / "m", min_params=5)
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()
