"""Property-based fuzzing of ``adapter_config.json`` (issue 15 items 5 and 10): one reader, one verdict.

Generated configs (random JSON types for every key PEFT uses), mutated valid configs and random bytes are written
beside a fixed tiny ``adapter_model.safetensors``. Each must end in an adapter read (edits with finite scales) or a
one-line LorafuseError, never another exception (every entry point merges through the one pipeline and its one
reader: there is no second reader to disagree). ``ADAPTER_CONFIG_JSON`` (a config for a bare adapter) is checked by
the same reader and must give the same verdict. Bounded and reproducible: a few seconds per
test, ``derandomize=True``, no example database.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors.torch import save_file

from lorafuse.edits import LoraDelta
from lorafuse.errors import LorafuseError
from lorafuse.formats.peft import read_peft_adapter
from lorafuse.peft_flags import UNSUPPORTED_FLAGS
from lorafuse.sources.adapter_config import env_config
from lorafuse.tuners import tuner_of

SETTINGS = settings(
    max_examples=700,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
VALID = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 2,
    "lora_alpha": 4,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "init_lora_weights": True,
    "base_model_name_or_path": "org/base",
    "revision": None,
    "inference_mode": True,
}
# Every key PEFT's LoraConfig saves that lorafuse reads (or must refuse), and a few it ignores.
KEYS = [
    *VALID,
    "lora_bias",
    "trainable_token_indices",
    "ensure_weight_tying",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    *UNSUPPORTED_FLAGS,
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An adapter folder whose weights stay fixed: two plain rank-2 LoRA modules."""
    root = tmp_path_factory.mktemp("fuzz-adapter-config") / "adapter"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for module in MODULES:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, 4, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(4, 2, generator=gen)
    save_file(tensors, root / "adapter_model.safetensors")
    return root


def note(outcome: str) -> None:
    """Count outcomes (pytest --hypothesis-show-statistics tells refusals from reads)."""
    if currently_in_test_context():
        event(outcome)


def verdict(folder: Path) -> tuple[str, object]:
    """("read", {module: scale}) or ("refused", message) from the PEFT reader."""
    try:
        adapter = read_peft_adapter(folder)
    except LorafuseError as exc:
        return "refused", str(exc)
    try:
        scales = {t.target: t.edit.scale for t in adapter.edits if isinstance(t.edit, LoraDelta)}
    finally:
        adapter.checkpoint.close()
    assert all(math.isfinite(s) for s in scales.values()), f"a non-finite scale was accepted: {scales}"
    return "read", scales


def check(folder: Path, raw: bytes) -> None:
    """Write ``raw`` as the folder's adapter_config.json; the reader must end well: read, or one line."""
    (folder / "adapter_config.json").write_bytes(raw)
    kind, value = verdict(folder)
    if kind == "refused":
        assert "\n" not in str(value), f"a message of several lines: {value!r}"
    note(kind)
    # The same text as ADAPTER_CONFIG_JSON (a config for an adapter without one): the same reader.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return  # an environment variable holds text
    if not text.strip():
        return  # an empty variable is no config
    try:
        env_config({"ADAPTER_CONFIG_JSON": text})
        env = "read"
    except LorafuseError:
        env = "refused"
    if env == "read" and kind == "refused" and _other_tuner(text):
        # A valid config of another tuner type over these LoRA tensors: the variable alone cannot know the
        # tensors, the folder read refuses them by name.
        assert "tensor" in str(value), value
        return
    assert env == kind, f"ADAPTER_CONFIG_JSON {env} what the adapter folder {kind}"


def _other_tuner(text: str) -> bool:
    """Whether ``text`` names a registered PEFT tuner type other than LoRA."""
    try:
        peft_type = json.loads(text).get("peft_type", "LORA")
    except (ValueError, AttributeError, RecursionError):
        return False
    return isinstance(peft_type, str) and peft_type.upper() != "LORA" and tuner_of(peft_type) is not None


def dumps(config: object) -> bytes:
    """JSON as Python writes it: NaN and Infinity included (Python's json reads them back)."""
    try:
        return json.dumps(config).encode()
    except (RecursionError, ValueError):
        return b"{}"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
# Values close to what PEFT writes, so that the checks past the first key are reached.
regexes = st.sampled_from(["q_proj", ".*q_proj", "(q|v)_proj", "q_proj(", "[", "a{99999999999}", "*", "", "all-linear"])
names = st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "", "embed_tokens"]) | json_values, max_size=4)
numbers = (
    st.sampled_from([0, 1, 2, 4, 8, -1, 0.5, 2.0, 1e308, 10**400, math.nan, math.inf, -math.inf, True, "8"])
    | json_values
)
plausible = {
    "peft_type": st.sampled_from(["LORA", "lora", "IA3", "", "LoRA"]) | json_values,
    "r": numbers,
    "lora_alpha": numbers,
    "target_modules": regexes | names | json_values,
    "modules_to_save": names | json_values,
    "rank_pattern": st.dictionaries(regexes | st.text(max_size=6), numbers, max_size=3) | json_values,
    "alpha_pattern": st.dictionaries(regexes | st.text(max_size=6), numbers, max_size=3) | json_values,
    "bias": st.sampled_from(["none", "all", "lora_only", "None", ""]) | json_values,
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora_x", "loftq"]) | json_values,
    "trainable_token_indices": st.lists(st.integers(-2, 200), max_size=3) | json_values,
}


def value_for(key: str):
    return plausible.get(key, st.booleans() | json_values)


@st.composite
def generated(draw) -> bytes:
    """A config of random keys, each with a random value of a random type."""
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS)))
    return dumps({key: draw(value_for(key)) for key in keys})


@st.composite
def mutated(draw) -> bytes:
    """A valid config with a few keys replaced, removed or added, or its text cut or spliced."""
    config = dict(VALID)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(KEYS))
        if draw(st.booleans()) and key in config:
            del config[key]
        else:
            config[key] = draw(value_for(key))
    raw = dumps(config)
    how = draw(st.sampled_from(["as is", "as is", "cut", "splice"]))
    if how == "cut":
        return raw[: draw(st.integers(0, len(raw)))]
    if how == "splice":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(max_size=8)) + raw[at:]
    return raw


def nested(depth: int, key: str) -> bytes:
    return b'{"peft_type": "LORA", "%s": ' % key.encode() + b"[" * depth + b"]" * depth + b"}"


@settings(SETTINGS, max_examples=500)
@given(raw=generated())
def test_generated_configs(folder, raw):
    check(folder, raw)


@SETTINGS
@given(raw=mutated())
def test_mutated_valid_configs(folder, raw):
    check(folder, raw)


@settings(SETTINGS, max_examples=300)
@given(
    raw=st.binary(max_size=64)
    | st.sampled_from([b"", b"null", b"[]", b"1e999", b"{}", b'{"r": 1' + b"0" * 5000 + b"}"])
)
def test_random_bytes(folder, raw):
    check(folder, raw)


@pytest.mark.parametrize("depth", [40, 5_000, 200_000])
@pytest.mark.parametrize("key", ["lora_alpha", "task_type", "target_modules"])
def test_deep_nesting_is_a_one_line_refusal(folder, depth, key):
    check(folder, nested(depth, key))
    kind, message = verdict(folder)
    assert kind == "refused" and "adapter_config.json" in message and "nest" in message


def test_nesting_within_the_limit_is_read(folder):
    check(folder, nested(30, "task_type"))  # task_type means nothing to a merge
    assert verdict(folder)[0] == "read"


def test_the_valid_config_is_read(folder):
    """The fixed point the mutations start from: read, with PEFT's scales (so the refusals are not vacuous)."""
    check(folder, dumps(VALID))
    assert verdict(folder) == ("read", {f"{m}.weight": 2.0 for m in MODULES})
