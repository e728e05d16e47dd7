"""lorafuse's BPE pre-tokenizer table (gguf_pretokenizers.py) against the one in llama.cpp's converter source, read
from the fetched converter with ``ast`` (the converter is not run: its identification is a chain of
``if chkhsh == "...": res = "..."`` statements inside ``get_vocab_base_pre``)."""

from __future__ import annotations

import ast

from gguf_oracle import llama_cpp_tree

from lorafuse.gguf_pretokenizers import CHECK_TEXT, PRE_TOKENIZERS


def converter_pre_tokenizers() -> tuple[str, dict[str, str]]:
    """The converter's check text and its hash -> name table (a later ``if`` for the same hash wins, as there)."""
    tree = llama_cpp_tree()
    sources = [tree / "conversion" / "base.py", tree / "convert_hf_to_gguf.py"]
    for source in sources:
        if not source.is_file():
            continue
        module = ast.parse(source.read_text(encoding="utf-8"))
        function = next(
            (n for n in ast.walk(module) if isinstance(n, ast.FunctionDef) and n.name == "get_vocab_base_pre"), None
        )
        if function is not None:
            break
    else:
        raise AssertionError(f"no get_vocab_base_pre in {sources}")
    text = None
    table: dict[str, str] = {}
    for node in function.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["chktxt"]:
            text = ast.literal_eval(node.value)
        if not isinstance(node, ast.If):
            continue
        test = node.test
        if not (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "chkhsh"):
            continue
        assert isinstance(test.ops[0], ast.Eq) and len(test.comparators) == 1, ast.unparse(test)
        assign = next(n for n in node.body if isinstance(n, ast.Assign))
        assert [t.id for t in assign.targets] == ["res"], ast.unparse(assign)
        table[ast.literal_eval(test.comparators[0])] = ast.literal_eval(assign.value)
    assert text is not None, "the converter's check text (chktxt) was not found"
    return text, table


def test_pre_tokenizer_table_equals_the_converters():
    text, table = converter_pre_tokenizers()
    assert len(table) > 50  # the parse found the chain, not a fragment of it
    assert text == CHECK_TEXT
    assert PRE_TOKENIZERS == table
