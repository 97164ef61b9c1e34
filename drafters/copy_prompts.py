"""Copy-heavy prompts for an experiment: summaries, extractions and questions about a passage in
the prompt (the `tasks` recipe's three passage categories, in turn), half of them about a long
passage of 300-1000 words: a whole chat of the chitchat training split, or a standard-library
module's documentation as one page. Training split only (`tasks.held_out`); one JSON line per
prompt ({"messages": [...]}), for `train-drafter --data FILE --max-len 1536` to answer into shards.

    .venv/bin/python drafters/copy_prompts.py 420 7 > /tmp/copy.jsonl
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtpspec.train import tasks as T  # noqa: E402


def doc_pages(lo: int, hi: int) -> list[str]:
    """Each module's prose docstrings (15+ words) in source order under their names, up to hi words;
    pages of at least lo words whose file name is not held out."""
    pages = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        parts, n = [], 0
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or ">>>" in doc or "::" in doc or T._words(doc) < 15:
                continue
            if n + T._words(doc) > hi:
                break
            parts.append(f"{'Module ' + f.stem if isinstance(node, ast.Module) else node.name}\n\n{doc.strip()}")
            n += T._words(doc)
        if n >= lo and not T.held_out(f.name):
            pages.append("\n\n".join(parts))
    return pages


def main() -> None:
    n, seed = int(sys.argv[1]), int(sys.argv[2])
    short_t = T._transcripts(60, 220) + T._transcripts(150, 260)
    docs = tuple(d for d in T._stdlib_material()[0] if not T.held_out(d))
    long_t, long_d = T._transcripts(300, 1000), tuple(doc_pages(300, 1000))
    print(f"{len(long_t)} long chats, {len(long_d)} documentation pages", file=sys.stderr)
    rng = random.Random(seed)
    makers = [T._summarization, T._extraction, T._passage_qa]
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        long = rng.random() < 0.5
        msgs = makers[len(out) % 3](rng, long_t if long else short_t, long_d if long else docs)
        text = msgs[-1]["content"]
        if text in seen or T.held_out(text):
            continue
        seen.add(text)
        out.append({"messages": msgs})
    for o in out:
        print(json.dumps(o))


if __name__ == "__main__":
    main()
