"""Prompts files (.jsonl with a "prompt" per line, or plain lines) and their errors."""

from __future__ import annotations

import pytest

from mtpspec.errors import InputError
from mtpspec.prompts_file import read_prompts


def test_jsonl_and_plain_lines(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a b"}\n\n{"prompt": "c", "source": "x"}\n')
    assert read_prompts(j) == ["a b", "c"]
    t = tmp_path / "p.txt"
    t.write_text("first\n\n  second  \n")
    assert read_prompts(t) == ["first", "  second  "]


@pytest.mark.parametrize("content, match", [
    ("", "no prompts"),
    ("\n  \n", "no prompts"),
    ('{"prompt": "ok"}\n{not json\n', r"p\.jsonl:2: not valid JSON"),
    ('{"text": "x"}\n', r'p\.jsonl:1: expected an object with a string "prompt"'),
    ('["x"]\n', "expected an object"),
])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(InputError, match=match):
        read_prompts(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
