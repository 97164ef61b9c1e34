"""The `tasks` data recipe (mtpspec/train/tasks.py): every category filled, deterministic per
seed, different across seeds, a held-out split whose prompts and material never reach training
whatever the seed, drafters/heldout-tasks.jsonl in step with the code, the recipe's prompts fit
`max_len` with room for an answer, and nothing shared with the broad benchmark."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("chitchat_dataset")

from mtpspec.train import tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _texts(pairs) -> list[str]:
    return [msgs[-1]["content"] for _, msgs in pairs]


@pytest.fixture(scope="module")
def train0():
    return tasks.task_prompts(0)


def test_every_category_filled_with_distinct_user_prompts(train0):
    counts = Counter(key.split("/")[0] for key, _ in train0)
    assert counts == {c: tasks.PER_CATEGORY for c in tasks.CATEGORIES}
    texts = _texts(train0)
    assert len(set(texts)) == len(texts)
    assert all(len(m) == 1 and m[0]["role"] == "user" and m[0]["content"].strip() for _, m in train0)
    prose = [re.sub(r"```.*?```", "", t, flags=re.S) for t in texts]  # code may hold f-string fields
    assert not [t for t in prose if re.search(r"\{[a-z]\}", t)], "an unfilled template field"


def test_same_seed_same_prompts_other_seed_other_prompts(train0):
    assert tasks.task_prompts(0, per_category=20) == [p for p in train0 if int(p[0].split("/")[1]) < 20]
    other = set(_texts(tasks.task_prompts(1)))
    assert len(other & set(_texts(train0))) < 0.5 * len(other)


def _material(held: bool) -> list[str]:
    """Every sentence, conversation, docstring and function of a split the recipe fills its templates with."""
    docs, funcs = tasks._stdlib_material()
    return (tasks._sentences(held) + tasks._transcripts(60, 220, held) + tasks._transcripts(150, 260, held)
            + [x for x in docs + funcs if tasks.held_out(x) == held])


def test_held_out_prompts_and_material_never_reach_training(train0):
    held = tasks.task_prompts(0, held=True, per_category=20)
    assert Counter(k.split("/")[0] for k, _ in held) == {c: 20 for c in tasks.CATEGORIES}
    assert all(tasks.held_out(t) for t in _texts(held)) and not any(tasks.held_out(t) for t in _texts(train0))
    trained = _texts(train0) + _texts(tasks.task_prompts(3))
    assert not set(_texts(held)) & set(trained)
    by_line: dict[str, list[str]] = {}  # material by its first line, to find it in a prompt quickly
    for m in _material(False) + _material(True):
        by_line.setdefault(m.splitlines()[0], []).append(m)

    def material_in(text):
        return {m for ln in text.splitlines() for key in [ln, *re.findall(r'"([^"]+)"', ln), ln.removeprefix("A: ")]
                for m in by_line.get(key, []) if m in text}

    held_material = set().union(*map(material_in, _texts(held)))
    trained_material = set().union(*map(material_in, trained))
    assert len(held_material) >= 50 and len(trained_material) >= 1000  # the lookup finds material
    assert held_material <= set(_material(True))
    assert not held_material & trained_material


def test_heldout_tasks_file_matches_the_code():
    from mtpspec.train.data import heldout_prompts

    lines = (ROOT / "drafters" / "heldout-tasks.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(ln)["prompt"] for ln in lines] == heldout_prompts()["tasks"]
    assert len(lines) == 3 * len(tasks.CATEGORIES)


def test_recipe_keeps_room_for_an_answer_and_skips_nothing_else():
    from mtpspec.train.data import DataBuilder

    class CharTokenizer:  # one token per character, no chat template
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            return [ord(c) % 300 for c in text]

    wide = DataBuilder(CharTokenizer(), max_len=100000).recipe("tasks", None)
    assert len(wide) == tasks.PER_CATEGORY * len(tasks.CATEGORIES)
    assert all(s.needs_response and s.loss_from == len(s.ids) for s in wide)
    narrow = DataBuilder(CharTokenizer(), max_len=400).recipe("tasks", None)
    assert narrow and len(narrow) < len(wide) and max(len(s.ids) for s in narrow) <= 400 - 64
    assert len(DataBuilder(CharTokenizer(), max_len=100000).recipe("tasks", 50)) == 50


def test_nothing_shared_with_the_broad_benchmark(train0):
    from mtpspec.bench.heldout import load_heldout

    def runs(text, n=8):
        w = re.findall(r"[a-z0-9]+", text.lower())
        return set(zip(*(w[i:] for i in range(n))))

    bench = [m["content"] for ps in load_heldout().values() for p in ps for m in p.messages]
    bench_runs = set().union(*map(runs, bench))
    bench_norm = {" ".join(re.findall(r"[a-z0-9]+", b.lower())) for b in bench}
    for t in _texts(train0) + _texts(tasks.task_prompts(0, held=True, per_category=20)):
        assert not runs(t) & bench_runs, f"shares an 8-word run with the benchmark: {t[:80]!r}"
        assert " ".join(re.findall(r"[a-z0-9]+", t.lower())) not in bench_norm, t
