"""Hostile numbers and configs (issue 15, items 5, 7, 8, 10, 11): every command that takes them refuses them.

NaN/Inf strengths and alphas, ``r`` that is no positive whole number, bad ``target_modules``/``alpha_pattern``/
``rank_pattern``, deeply nested JSON, rank-0 factors, lora_A/lora_B ranks that differ, NaN/Inf in models to extract
from, ``--device tpu``: each through every command that takes it (merge,
merge-adapter, lora-merger, combine, extract, lora-extractor, inspect, verify), checking the exit code, one line
naming the value, inputs byte for byte unchanged and nothing left beside the output. Inf in a base tensor no adapter
touches is copied, with a warning naming it.

Models and adapters are built by hand (a few KB). Most commands run in-process (their ``main``, output captured:
an unexpected exception fails the test as a traceback would); a few run as real child processes.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import Result, assert_no_litter, assert_refused, run_command, snapshot
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse import cli
from lorafuse.cli import compat
from lorafuse.cli.compat import lora_merger
from lorafuse.combine import combine
from lorafuse.errors import AdapterError, InputError, LorafuseError
from lorafuse.extract import extract

PEFT = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
DIM, RANK = 8, 2
ADAPTER_COMMANDS = ("merge", "merge-adapter", "lora-merger", "combine", "inspect", "verify")


# ---- tiny inputs ----------------------------------------------------------------------------------------------


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{Q}.weight": torch.randn(DIM, DIM, generator=gen),
        f"{V}.weight": torch.randn(DIM, DIM, generator=gen),
        "model.norm.weight": torch.ones(DIM),
    }


def make_base(folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A model folder lorafuse merges into: config.json (a Llama, untied) and one safetensors file."""
    folder.mkdir(parents=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors if tensors is not None else _tensors(0), folder / "model.safetensors")
    return folder


def make_adapter(folder: Path, config: dict | str | None = None, factors: dict[str, tuple] | None = None) -> Path:
    """A PEFT LoRA folder; ``config`` (a dict, or raw JSON text) replaces the valid one, ``factors`` maps a module
    to the shapes of its (lora_A, lora_B)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for module, (a_shape, b_shape) in (
        factors or {Q: ((RANK, DIM), (DIM, RANK)), V: ((RANK, DIM), (DIM, RANK))}
    ).items():
        tensors[f"{PEFT}{module}.lora_A.weight"] = torch.randn(*a_shape, generator=gen)
        tensors[f"{PEFT}{module}.lora_B.weight"] = torch.randn(*b_shape, generator=gen)
    save_file(tensors, folder / "adapter_model.safetensors")
    valid = {"peft_type": "LORA", "r": RANK, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    text = config if isinstance(config, str) else json.dumps(valid if config is None else {**valid, **config})
    (folder / "adapter_config.json").write_text(text)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("models") / "base")


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapters") / "good")


# ---- running the commands -------------------------------------------------------------------------------------

MAINS = {
    "lorafuse": cli.main,
    "merge-adapter": compat.merge_adapter_main,
    "lora-merger": compat.merger_main,
    "lora-extractor": compat.extractor_main,
}


def run_here(command: str, *args) -> Result:
    """A console script's ``main`` in this process, with its stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = MAINS[command]([str(a) for a in args])
    if command == "merge-adapter":  # its one FAILED line goes to stdout, by the original script's contract
        return Result(code, "", out.getvalue() + err.getvalue())
    return Result(code, out.getvalue(), err.getvalue())


def adapter_command(kind: str, base: Path, adapter: Path, out_dir: Path, monkeypatch) -> Result:
    """Run command ``kind`` (one of ADAPTER_COMMANDS) on ``adapter``, writing (if at all) into ``out_dir``."""
    if kind == "merge":
        return run_here("lorafuse", "merge", base, adapter, "-o", out_dir / "merged")
    if kind == "merge-adapter":
        work = out_dir.parent / f"{out_dir.name}-work"  # merge-adapter's own work folder, made first by design
        return run_here(
            "merge-adapter", "--base_model", base, "--adapter_repo_url", adapter, "--work_dir", work,
            "--output_dir", out_dir / "merged",
        )  # fmt: skip
    if kind == "lora-merger":
        return run_here(
            "lora-merger", "--source-model", base, "--lora-model", adapter, "--output", out_dir / "merged.safetensors"
        )
    if kind == "combine":
        return run_here("lorafuse", "combine", adapter, adapter, "-o", out_dir / "combined")
    if kind == "inspect":
        return run_here("lorafuse", "inspect", adapter)
    assert kind == "verify"
    return run_here("lorafuse", "verify", base, "--base", base, "--adapter", adapter, "--no-output-check")


def assert_clean_refusal(result: Result, needles: tuple[str, ...], inputs: dict, out_dir: Path) -> str:
    """Refused in one line naming ``needles``; inputs unchanged; nothing written where the output would go."""
    line = assert_refused(result, *needles)
    assert snapshot(*map(Path, inputs)) == inputs, "an input changed"
    assert_no_litter(out_dir)
    return line


# ---- adapter_config.json values ---------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than json's recursion limit
NESTED = "[" * 40 + "]" * 40  # parses, but no PEFT config nests like this
CONFIG_CASES = {
    # case: (config changes, or raw JSON text; what the error line must name)
    "alpha-nan": ('{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}', ("lora_alpha", "nan", "finite")),
    "alpha-inf": ('{"peft_type": "LORA", "r": 2, "lora_alpha": -Infinity}', ("lora_alpha", "-inf")),
    "alpha-string": ({"lora_alpha": "16"}, ("lora_alpha", "'16'", "not a number")),
    "alpha-bool": ({"lora_alpha": True}, ("lora_alpha", "True", "not a number")),
    "r-word": ({"r": "eight"}, ("r is 'eight'", "whole number")),
    "r-zero": ({"r": 0}, ("r is 0", "whole number")),
    "r-float": ({"r": 2.5}, ("r is 2.5",)),
    "target-bad-regex": ({"target_modules": "q_proj("}, ("target_modules", "'q_proj('", "regular expression")),
    "target-not-string": ({"target_modules": ["q_proj", 7]}, ("target_modules entry 1", "7")),
    "target-number": ({"target_modules": 3}, ("target_modules", "3")),
    "alpha-pattern-list": ({"alpha_pattern": ["q_proj", 8]}, ("alpha_pattern", "must map module names")),
    "alpha-pattern-nan": ('{"r": 2, "alpha_pattern": {"q_proj": NaN}}', ("alpha_pattern['q_proj']", "nan")),
    "alpha-pattern-bad-key": ({"alpha_pattern": {"q_proj[": 8}}, ("alpha_pattern key", "q_proj[")),
    "rank-pattern-word": ({"rank_pattern": {"q_proj": "four"}}, ("rank_pattern['q_proj']", "'four'")),
    "rslora-string": ({"use_rslora": "false"}, ("use_rslora", "true or false")),
    "deeply-nested": ('{"lora_alpha": ' + DEEP + "}", ("adapter_config.json", "nested too deeply")),
    "nested": ('{"peft_type": "LORA", "r": 2, "task_type": ' + NESTED + "}", ("adapter_config.json", "nests more")),
}
# The cases the issue names go through every command; the others (same parser) through the merge paths.
EVERY_COMMAND = ("alpha-nan", "r-word", "target-bad-regex", "target-not-string", "alpha-pattern-list", "deeply-nested")


def _config_matrix():
    for case in CONFIG_CASES:
        kinds = ADAPTER_COMMANDS if case in EVERY_COMMAND else ("merge",)
        for kind in kinds:
            yield pytest.param(case, kind, id=f"{case}-{kind}")


@pytest.mark.parametrize("case,kind", list(_config_matrix()))
def test_bad_config_value_is_refused(case, kind, base, tmp_path, monkeypatch):
    config, needles = CONFIG_CASES[case]
    adapter = make_adapter(tmp_path / "inputs" / "adapter", config)
    inputs = snapshot(base, adapter)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = adapter_command(kind, base, adapter, out_dir, monkeypatch)
    line = assert_clean_refusal(result, needles, inputs, out_dir)
    assert str(adapter / "adapter_config.json") in line  # the file at fault, by its path


@pytest.mark.parametrize(
    "config",
    [{"lora_alpha": math.nan}, {"r": 0}, {"target_modules": ["q_proj", None]}, {"alpha_pattern": {"q": math.inf}}],
    ids=["alpha-nan", "r-zero", "target-none", "alpha-pattern-inf"],
)
def test_a_config_given_for_a_bare_adapter_is_checked_before_any_work_folder(config, base, good_adapter, tmp_path):
    """``adapter_config=`` (a mapping, a file, ADAPTER_CONFIG_JSON) is checked by the same reader, named by origin."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_model.safetensors").write_bytes((good_adapter / "adapter_model.safetensors").read_bytes())
    valid = json.loads((good_adapter / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="the adapter_config given"):
        lorafuse.merge(base, [bare], tmp_path / "out", adapter_config={**valid, **config}, work_dir=tmp_path / "w")
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()


# ---- broken LoRA factors (rank 0, A/B ranks that differ) ---------------------------------------------------------

FACTOR_CASES = {
    "rank-zero": ({Q: ((0, DIM), (DIM, 0))}, ("q_proj", "rank 0")),
    "ranks-differ": ({Q: ((RANK, DIM), (DIM, RANK + 1))}, ("q_proj", "(2, 8)", "(8, 3)", "disagree on the rank")),
}


@pytest.mark.parametrize("kind", ADAPTER_COMMANDS)
@pytest.mark.parametrize("case", list(FACTOR_CASES))
def test_broken_factors_are_refused(case, kind, base, tmp_path, monkeypatch):
    factors, needles = FACTOR_CASES[case]
    adapter = make_adapter(tmp_path / "inputs" / "adapter", factors=factors)
    inputs = snapshot(base, adapter)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = assert_clean_refusal(adapter_command(kind, base, adapter, out_dir, monkeypatch), needles, inputs, out_dir)
    assert str(adapter / "adapter_model.safetensors") in line


def _plain_file(path: Path, alpha: float, a_shape=(RANK, DIM), b_shape=(DIM, RANK)) -> Path:
    """A single-file LoRA without PEFT's prefix (``<module>.lora_A.weight``, ``.alpha``): read by formats/lowrank."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{Q}.lora_A.weight": torch.randn(*a_shape),
        f"{Q}.lora_B.weight": torch.randn(*b_shape),
        f"{Q}.alpha": torch.tensor(alpha),
    }
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    "alpha,shapes,needles",
    [
        (math.nan, ((RANK, DIM), (DIM, RANK)), ("q_proj.alpha'", "nan")),
        (math.inf, ((RANK, DIM), (DIM, RANK)), ("q_proj.alpha'", "inf")),
        (4.0, ((0, DIM), (DIM, 0)), ("q_proj", "rank 0")),
        (4.0, ((RANK, DIM), (DIM, 1)), ("q_proj", "disagree on the rank")),
    ],
    ids=["alpha-nan", "alpha-inf", "rank-zero", "ranks-differ"],
)
@pytest.mark.parametrize("kind", ["merge", "lora-merger", "combine", "inspect"])
def test_single_file_lora_with_broken_values_is_refused(kind, alpha, shapes, needles, base, tmp_path, monkeypatch):
    adapter = _plain_file(tmp_path / "inputs" / "lora.safetensors", alpha, *shapes)
    inputs = snapshot(base, adapter.parent)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = assert_clean_refusal(adapter_command(kind, base, adapter, out_dir, monkeypatch), needles, inputs, out_dir)
    assert str(adapter) in line


# ---- strengths: --weight, --alpha, --weights ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", ["merge", "lora-merger", "combine", "verify"])  # merge-adapter has no strength flag
def test_non_finite_strength_is_refused(kind, value, base, good_adapter, tmp_path, monkeypatch):
    inputs = snapshot(base, good_adapter)
    out = tmp_path / "out"
    out.mkdir()
    # FLAG=VALUE: argparse would read "-inf" as an option
    if kind == "merge":
        result = run_here("lorafuse", "merge", base, good_adapter, "-o", out / "m", f"--weight={value}")
        flag = "--weight"
    elif kind == "lora-merger":
        args = ("--source-model", base, "--lora-model", good_adapter, "--output", out / "m", f"--alpha={value}")
        result = run_here("lora-merger", *args)
        flag = "--alpha"
    elif kind == "combine":
        result = run_here("lorafuse", "combine", good_adapter, "-o", out / "c", f"--weights={value}")
        flag = "--weights"
    else:
        args = ("verify", base, "--base", base, "--adapter", good_adapter, f"--weight={value}", "--no-output-check")
        result = run_here("lorafuse", *args)
        flag = "--weight"
    assert_clean_refusal(result, (flag, value, "finite"), inputs, out)


@pytest.mark.parametrize("weight", [math.nan, math.inf, True, "0.5", None])
def test_the_api_refuses_strengths_that_are_not_finite_numbers(weight, base, good_adapter, tmp_path):
    with pytest.raises(LorafuseError, match="--weight is .*not a"):
        lorafuse.merge(base, [good_adapter], tmp_path / "m", weights=[weight])
    with pytest.raises(LorafuseError, match="--weights is .*not a"):
        combine([good_adapter, good_adapter], tmp_path / "c", weights=[1.0, weight])
    with pytest.raises(LorafuseError, match=r"strength of .*\(--weight, --alpha\) is .*not a"):
        lora_merger.merge_file(base, good_adapter, tmp_path / "m.safetensors", alpha=weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_finite_alpha_times_a_finite_weight_that_overflows_is_refused(base, tmp_path, monkeypatch):
    adapter = make_adapter(tmp_path / "inputs" / "strong", {"lora_alpha": 1e308, "r": RANK})
    inputs = snapshot(base, adapter)
    out = tmp_path / "out"
    out.mkdir()
    result = run_here("lorafuse", "merge", base, adapter, "-o", out / "m", "--weight", "1e10")
    assert_clean_refusal(result, ("q_proj", "strength 1e+10", "not a finite number"), inputs, out)
    result = run_here("lorafuse", "combine", adapter, adapter, "-o", out / "c", "--weights", "1e10", "1")
    assert_clean_refusal(result, ("q_proj", "weight 1e+10", "not a finite number"), inputs, out)


def test_combined_factors_that_overflow_fp16_are_not_written(tmp_path):
    adapter = make_adapter(tmp_path / "inputs" / "big", {"lora_alpha": 1e6, "r": RANK})
    with pytest.raises(
        LorafuseError,
        match="q_proj.lora_A.weight of the combined adapter holds NaN or Inf in float16: use smaller --weights",
    ):
        combine([adapter], tmp_path / "out" / "c", dtype="fp16")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- --device ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["merge", "extract", "lora-extractor", "lora-merger", "verify"])
def test_unknown_device_is_refused_in_one_line(kind, base, good_adapter, tmp_path, monkeypatch):
    tuned = make_base(tmp_path / "inputs" / "tuned", _tensors(5))
    inputs = snapshot(base, good_adapter, tuned)
    out = tmp_path / "out"
    out.mkdir()
    device = ("--device", "tpu")
    if kind == "merge":
        result = run_here("lorafuse", "merge", base, good_adapter, "-o", out / "m", *device)
    elif kind == "extract":
        result = run_here("lorafuse", "extract", base, tuned, "-o", out / "x", *device)
    elif kind == "lora-extractor":
        result = run_here(
            "lora-extractor", "--source-model", base, "--target-model", tuned, "--output", out / "x", *device
        )
    elif kind == "lora-merger":
        result = run_here(
            "lora-merger", "--source-model", base, "--lora-model", good_adapter, "--output", out / "m", *device
        )
    else:
        result = run_here("lorafuse", "verify", base, "--base", base, "--adapter", good_adapter, *device)
    assert_clean_refusal(result, ("--device 'tpu'", "cpu, cuda or cuda:N"), inputs, out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_in_one_line(base, good_adapter, tmp_path):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(LorafuseError, match="no CUDA device is available: use --device cpu"):
            lorafuse.merge(base, [good_adapter], tmp_path / "m", device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_index_beyond_the_machine_is_refused(base, good_adapter, tmp_path):
    count = torch.cuda.device_count()
    with pytest.raises(LorafuseError, match=f"this machine has {count} CUDA device"):
        lorafuse.merge(base, [good_adapter], tmp_path / "m", device=f"cuda:{count}")
    assert not (tmp_path / "m").exists()
    lorafuse.merge(base, [good_adapter], tmp_path / "ok", device="cuda:0")


@pytest.mark.parametrize(
    "value,accepted",
    [(0.5, 0.5), (-3, -3.0), (10**400, None), (np.float32("nan"), None), (np.float64(2), 2.0), (Fraction(1, 4), 0.25)],
)
def test_the_one_number_check(value, accepted):
    from lorafuse.peft_flags import finite_number, positive_int

    if accepted is None:
        with pytest.raises(LorafuseError, match="lora_alpha is .*, not a finite number: set it"):
            finite_number(value, "lora_alpha", "set it")
    else:
        assert finite_number(value, "lora_alpha", "set it") == accepted
    assert positive_int(3, "r", "fix") == 3
    for bad in (0, -1, 2.0, True, "3", None, 3.5):
        with pytest.raises(AdapterError, match=r"^r is .*, not a whole number of at least 1: fix$"):
            positive_int(bad, "r", "fix")


# ---- extract: NaN/Inf in the tuned or the base model --------------------------------------------------------------


def _poisoned(tensors: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    changed = {k: v.clone() for k, v in tensors.items()}
    changed[name][1, 2] = value
    return changed


EXTRACT_CASES = {
    # case: (base tensors, tuned tensors, the model and tensor the error names)
    "nan-in-tuned": (_tensors(0), _poisoned(_tensors(7), f"{Q}.weight", math.nan), ("tuned", f"'{Q}.weight'")),
    "inf-in-tuned": (_tensors(0), _poisoned(_tensors(7), f"{V}.weight", math.inf), ("tuned", f"'{V}.weight'")),
    "inf-in-base": (_poisoned(_tensors(0), f"{V}.weight", -math.inf), _tensors(7), ("base", f"'{V}.weight'")),
    "nan-in-both": (
        _poisoned(_tensors(0), f"{Q}.weight", math.nan),
        _poisoned(_tensors(7), f"{Q}.weight", math.nan),
        ("tuned", f"'{Q}.weight'"),
    ),
}


@pytest.mark.parametrize("fmt", ["peft", "diffusion-lora", "diffusion", "lora-extractor"])
@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_extract_refuses_nan_or_inf_naming_the_tensor(case, fmt, tmp_path):
    base_tensors, tuned_tensors, needles = EXTRACT_CASES[case]
    base = make_base(tmp_path / "inputs" / "base", base_tensors)
    tuned = make_base(tmp_path / "inputs" / "tuned", tuned_tensors)
    inputs = snapshot(base, tuned)
    out = tmp_path / "out"
    out.mkdir()
    if fmt == "lora-extractor":
        result = run_here("lora-extractor", "--source-model", base, "--target-model", tuned, "--output", out / "x")
    else:  # diffusion-lora: factorised by the SVD (--min-params 1) rather than stored as full differences
        extra = ("--min-params", "1") if fmt == "diffusion-lora" else ()
        result = run_here("lorafuse", "extract", base, tuned, "-o", out / "x", "--format", fmt.split("-")[0], *extra)
    which, name = needles
    line = assert_clean_refusal(result, (f"of the {which} model", name, "NaN or Inf"), inputs, out)
    assert str((tuned if which == "tuned" else base) / "model.safetensors") in line
    assert "0.000e+00" not in result.out


def test_extract_refuses_nan_in_a_module_stored_whole(tmp_path):
    """modules_to_save copies a module's tuned tensors whole, unchanged ones too: a NaN there is refused as well."""
    base_tensors = {**_tensors(0), "model.norm.bias": torch.zeros(DIM)}
    tuned_tensors = {**base_tensors, "model.norm.bias": torch.full((DIM,), 0.5)}
    base_tensors["model.norm.weight"] = tuned_tensors["model.norm.weight"] = torch.full((DIM,), math.nan)
    base = make_base(tmp_path / "base", base_tensors)
    tuned = make_base(tmp_path / "tuned", tuned_tensors)
    with pytest.raises(LorafuseError, match="'model.norm.weight' of the tuned model holds NaN or Inf"):
        extract(base, tuned, tmp_path / "out" / "x", keep_full=["model.norm"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- Inf/NaN in a base tensor no adapter touches: copied, with a warning ------------------------------------------


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_untouched_non_finite_base_tensor_is_copied_with_a_warning(dtype, tmp_path):
    tensors = _tensors(0)
    tensors["model.norm.weight"][3] = math.inf
    tensors["model.extra.weight"] = torch.full((DIM,), -math.nan)
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    base = make_base(tmp_path / "base", tensors)
    adapter = make_adapter(tmp_path / "adapter")
    result = run_here("lorafuse", "merge", base, adapter, "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    provenance = json.loads((tmp_path / "merged" / "lorafuse_merge.json").read_text())
    warning = [w for w in provenance["warnings"] if "NaN or Inf" in w]
    assert warning == [
        "2 base tensor(s) that no adapter changes hold NaN or Inf and are copied as they are: model.extra.weight, "
        "model.norm.weight; the base model itself is broken there"
    ]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for name in ("model.norm.weight", "model.extra.weight"):  # byte for byte the base's
        assert torch.equal(merged[name].view(torch.uint8), tensors[name].view(torch.uint8))


def test_the_warning_names_the_first_few_of_many(tmp_path):
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.full((4, 4), math.nan, dtype=torch.bfloat16) for i in range(5)
    }
    tensors[f"{Q}.weight"] = torch.randn(DIM, DIM)
    tensors[f"{V}.weight"] = torch.randn(DIM, DIM)
    tensors["model.layers.9.mlp.down_proj.weight"] = torch.tensor([[-math.inf, 1.0]], dtype=torch.float16)
    base = make_base(tmp_path / "base", tensors)
    report = lorafuse.merge(base, [make_adapter(tmp_path / "adapter")], tmp_path / "merged")
    (warning,) = [w for w in report.warnings if "NaN or Inf" in w]
    assert warning.startswith(
        "6 base tensor(s) that no adapter changes hold NaN or Inf and are copied as they are: "
        "model.layers.0.mlp.up_proj.weight, model.layers.1.mlp.up_proj.weight, model.layers.2.mlp.up_proj.weight, ..."
    )


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -math.nan], ids=["inf", "-inf", "nan", "-nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_kind_of_non_finite_value_is_found(value, dtype, tmp_path):
    tensors = _tensors(0)
    tensors["model.norm.weight"][DIM - 1] = value  # the last element of the last chunk
    base = make_base(tmp_path / "base", {name: t.to(dtype) for name, t in tensors.items()})
    result = run_here("lorafuse", "merge", base, make_adapter(tmp_path / "adapter"), "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    provenance = json.loads((tmp_path / "merged" / "lorafuse_merge.json").read_text())
    assert [w for w in provenance["warnings"] if "NaN or Inf" in w and "model.norm.weight" in w]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_finite_base_gets_no_warning(dtype, good_adapter, tmp_path):
    tensors = _tensors(0)
    tensors["model.norm.weight"][3] = 65504 if dtype == torch.float16 else 3e38  # finite, at the top of the range
    tensors["model.norm.weight"][4] = -tensors["model.norm.weight"][3]
    base = make_base(tmp_path / "base", {name: t.to(dtype) for name, t in tensors.items()})
    result = run_here("lorafuse", "merge", base, good_adapter, "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    provenance = json.loads((tmp_path / "merged" / "lorafuse_merge.json").read_text())
    assert provenance["engine"] == "numpy" and provenance["warnings"] == []


def test_lora_merger_prints_the_warning(tmp_path):
    tensors = _tensors(0)
    tensors["model.norm.weight"][0] = -math.inf
    base = make_base(tmp_path / "base", tensors)
    result = run_here(
        "lora-merger", "--source-model", base, "--lora-model", make_adapter(tmp_path / "a"), "--output",
        tmp_path / "m.safetensors", "--output-dtype", "fp16",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "Warning: 1 base tensor(s) that no adapter changes hold NaN or Inf" in result.out
    assert "model.norm.weight" in result.out


# ---- real child processes: exit codes and tracebacks as a user sees them -------------------------------------------


def test_in_child_processes(base, tmp_path):
    adapter = make_adapter(tmp_path / "inputs" / "word-rank", {"r": "eight"})
    tuned = make_base(tmp_path / "inputs" / "tuned", _poisoned(_tensors(3), f"{Q}.weight", math.nan))
    inputs = snapshot(base, adapter, tuned)
    out = tmp_path / "out"
    out.mkdir()
    # The CLI's fast path once accepted r: "eight"; every merge reads the config with the one reader now.
    result = run_command("lorafuse", "merge", base, adapter, "-o", out / "m")
    assert_clean_refusal(result, ("lorafuse: error:", "r is 'eight'"), inputs, out)
    args = ("--source-model", base, "--lora-model", make_adapter(tmp_path / "good"), "--output", out / "m", "--alpha")
    result = run_command("lora-merger", *args, "nan")
    assert_clean_refusal(result, ("lora-merger: error:", "--alpha", "nan"), inputs, out)
    result = run_command("lorafuse", "extract", base, tuned, "-o", out / "x")
    assert_clean_refusal(result, ("lorafuse: error:", f"'{Q}.weight' of the tuned model"), inputs, out)


def test_read_errors_of_the_config_are_input_errors(tmp_path):
    from lorafuse.peft_flags import load_config

    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "adapter_config.json")
    (tmp_path / "adapter_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_config(tmp_path / "adapter_config.json")


def test_a_shard_size_too_large_for_a_float_is_one_line(tmp_path):
    """400 digits read as inf; int(inf) raised OverflowError, a traceback."""
    from hostile import assert_no_litter, assert_refused, run_command

    example = Path(__file__).resolve().parent.parent / "examples" / "tiny"
    size = "9" * 400 + "GB"
    result = run_command(
        "lorafuse", "merge", example / "base", example / "adapter", "-o", tmp_path / "out", "--max-shard-size", size
    )
    assert_refused(result, "cannot read size")
    assert_no_litter(tmp_path)
