"""Reading a prompts file: `.jsonl` with one {"prompt": "..."} object per line (the held-out sets
in drafters/), anything else one prompt per non-empty line. Shared by the CLI, the benchmarks and
drafter evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: prompts file does not exist")
    lines = [(i, ln) for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    if not lines:
        raise InputError(f"{p}: no prompts (the file has no non-empty lines)")
    if p.suffix != ".jsonl":
        return [ln for _, ln in lines]
    out = []
    for i, ln in lines:
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise InputError(f'{p}:{i}: expected an object with a string "prompt" field')
        out.append(obj["prompt"])
    return out
