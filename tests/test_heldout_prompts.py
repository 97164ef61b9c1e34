"""The broad held-out benchmark (mtpspec/bench/heldout.py, data in mtpspec/bench/heldout/*.jsonl):
every category has enough well-formed prompts with unique ids, no two prompts are equal or nearly
so, passages have the promised lengths, nothing comes from the drafter's training corpora or the
older held-out sets, the loader reports bad arguments clearly, prompts render with the chat
template, and the data files are package data."""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
import sysconfig
import tomllib
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from mtpspec.bench.heldout import (
    CATEGORIES,
    HeldoutError,
    Prompt,
    encode_prompt,
    load_category,
    load_heldout,
    mean_over_categories,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "mtpspec" / "bench" / "heldout"
MIN_PER_CATEGORY = 20
PASSAGE_WORDS = {"summarization": (120, 300), "long_context_qa": (600, 1200)}
NEAR_DUPLICATE = 0.8  # Jaccard similarity of word trigrams, or of word sets, at or above this
OVERLAP_WORDS = 8  # a run of this many words shared with a training corpus = taken from it


# ---- helpers -------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _norm(text: str) -> str:
    """Case, punctuation and spacing removed: equal after this = an exact duplicate."""
    return " ".join(_words(text))


def _shingles(text: str, k: int = 3) -> frozenset[tuple[str, ...]]:
    w = _words(text)
    return frozenset(zip(*(w[i:] for i in range(k)))) or frozenset([tuple(w)])


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b)


def _fingerprint(text: str) -> tuple[frozenset, frozenset]:
    return _shingles(text, 3), _shingles(text, 1)


def _similarity(a: tuple[frozenset, frozenset], b: tuple[frozenset, frozenset]) -> float:
    """The larger of the word-trigram and the word-set Jaccard similarities: trigrams catch copied
    passages, word sets catch a short prompt with a word or two changed (one word of 23 changed:
    trigrams 0.76, word set 0.92). A pair of sets whose sizes alone keep it below NEAR_DUPLICATE
    (Jaccard <= smaller / larger size) counts 0 without being compared."""
    best = 0.0
    for x, y in zip(a, b):
        if min(len(x), len(y)) >= NEAR_DUPLICATE * max(len(x), len(y)):
            best = max(best, _jaccard(x, y))
    return best


def _ngrams(text: str, n: int = OVERLAP_WORDS) -> set[tuple[str, ...]]:
    w = _words(text)
    return set(zip(*(w[i:] for i in range(n))))


def _raw(category: str) -> list[dict]:
    """The records of a category file, read without the loader."""
    lines = (DATA / f"{category}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def _all() -> list[Prompt]:
    return [p for ps in load_heldout().values() for p in ps]


def _conversation(p: Prompt) -> str:
    return "\n".join(m["content"] for m in p.messages)


def _texts_of_set() -> dict[str, str]:
    """Every message of every prompt, by "<id>/<message index>"."""
    return {f"{p.id}/{i}": m["content"] for p in _all() for i, m in enumerate(p.messages)}


def _shared_runs(texts: dict[str, str], corpus) -> dict[tuple[str, ...], set[str]]:
    """The OVERLAP_WORDS-word runs of `texts` that also occur in some text of `corpus`."""
    ours: dict[tuple[str, ...], set[str]] = {}
    for key, t in texts.items():
        for g in _ngrams(t):
            ours.setdefault(g, set()).add(key)
    return {g: ours[g] for doc in corpus for g in _ngrams(doc) & ours.keys()}


# ---- size and shape ------------------------------------------------------------------------------
def test_every_category_has_a_file_and_enough_prompts():
    assert len(CATEGORIES) == len(set(CATEGORIES)) == 12
    assert {f.stem for f in DATA.glob("*.jsonl")} == set(CATEGORIES), "a data file without a category or vice versa"
    for c in CATEGORIES:
        prompts = load_category(c)
        assert len(prompts) >= MIN_PER_CATEGORY, f"{c}: {len(prompts)} prompts"
        assert len(prompts) == len(_raw(c)), f"{c}: the loader returned {len(prompts)} of {len(_raw(c))} records"
        assert all(p.category == c for p in prompts)


def test_prompts_are_well_formed_and_ids_unique():
    ids = []
    for c in CATEGORIES:
        raw = _raw(c)
        for rec, p in zip(raw, load_category(c)):
            assert set(rec) <= {"id", "messages", "passage"}, f"{rec.get('id')}: unexpected keys {sorted(rec)}"
            assert re.fullmatch(rf"{c}-\d{{2,}}", rec["id"]), rec["id"]
            msgs = rec["messages"]
            assert [m["role"] for m in msgs] == ["user" if i % 2 == 0 else "assistant" for i in range(len(msgs))], (
                f"{rec['id']}: roles must alternate, user first")
            assert msgs[-1]["role"] == "user", f"{rec['id']}: the last message must be the user's"
            for m in msgs:
                assert set(m) == {"role", "content"} and isinstance(m["content"], str), rec["id"]
                assert m["content"].strip() and m["content"] == m["content"].strip(), f"{rec['id']}: empty or padded"
            if c == "multi_turn":
                assert len(msgs) >= 3, f"{rec['id']}: needs earlier turns"
            else:
                assert len(msgs) == 1, f"{rec['id']}: only multi_turn has earlier turns"
            assert ("passage" in rec) == (c in PASSAGE_WORDS), rec["id"]
            # the loader gives back exactly what the file says
            assert (p.id, [dict(m) for m in p.messages], p.passage) == (rec["id"], msgs, rec.get("passage"))
            assert p.text == msgs[-1]["content"] and p.chat() == msgs
            ids.append(rec["id"])
    assert len(ids) == len(set(ids)), "duplicate ids"


def test_passages_have_their_lengths_and_the_prompt_asks_something():
    for c, (lo, hi) in PASSAGE_WORDS.items():
        for p in load_category(c):
            assert p.passage is not None and p.passage in p.text, p.id
            n = len(p.passage.split())
            assert lo <= n <= hi, f"{p.id}: passage of {n} words, want {lo}-{hi}"
            rest = p.text.replace(p.passage, " ")
            assert len(rest.split()) >= 2, f"{p.id}: no instruction or question besides the passage"
    for c in set(CATEGORIES) - set(PASSAGE_WORDS):
        assert all(p.passage is None for p in load_category(c))


# ---- no duplicates -------------------------------------------------------------------------------
def test_no_exact_or_near_duplicate_prompts():
    prompts = _all()
    for what, text_of in (("conversation", _conversation), ("final message", lambda p: p.text)):
        seen: dict[str, str] = {}
        for p in prompts:
            key = _norm(text_of(p))
            assert key not in seen, f"{p.id} and {seen[key]}: same {what}"
            seen[key] = p.id
        fps = [(p.id, _fingerprint(text_of(p))) for p in prompts]
        for (i, a), (j, b) in itertools.combinations(fps, 2):
            assert _similarity(a, b) < NEAR_DUPLICATE, f"{i} and {j}: near-duplicate {what}s ({_similarity(a, b):.2f})"
    passages = [(p.id, _shingles(p.passage)) for p in prompts if p.passage]
    for (i, a), (j, b) in itertools.combinations(passages, 2):
        assert _jaccard(a, b) < 0.5, f"{i} and {j}: passages too similar ({_jaccard(a, b):.2f})"


# ---- held out from training ----------------------------------------------------------------------
def _older_prompts() -> dict[str, str]:
    """The older held-out sets, the `instructions` recipe's prompts (trained on) and the built-in
    bench prompts."""
    from mtpspec.bench.prompts import CHAT_PROMPTS
    from mtpspec.train.data import _instruction_prompts

    out = {}
    files = sorted((ROOT / "drafters").glob("heldout-*.jsonl"))
    assert files, "drafters/heldout-*.jsonl not found"
    for f in files:
        for i, ln in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if ln.strip():
                out[f"{f.name}:{i + 1}"] = json.loads(ln)["prompt"]
    out.update({f"instructions/{k}": t for k, t in _instruction_prompts()})
    out.update({f"bench-prompt-{i}": t for i, t in enumerate(CHAT_PROMPTS)})
    return out


def test_not_in_older_held_out_sets_instruction_recipe_or_bench_prompts():
    older = _older_prompts()
    older_norm = {_norm(t): k for k, t in older.items()}
    older_fps = [(k, _fingerprint(t)) for k, t in older.items()]
    for key, text in _texts_of_set().items():
        assert _norm(text) not in older_norm, f"{key} equals {older_norm[_norm(text)]}"
        fp = _fingerprint(text)
        for k, o in older_fps:
            assert _similarity(fp, o) < NEAR_DUPLICATE, f"{key} is a near duplicate of {k} ({_similarity(fp, o):.2f})"
    shared = _shared_runs(_texts_of_set(), older.values())
    assert not shared, f"word runs shared with older prompts: {list(shared.items())[:5]}"


def test_no_message_fits_an_instructions_recipe_template():
    from mtpspec.train.data import _TEMPLATES

    templates = [re.compile(re.escape(t).replace(re.escape("{t}"), ".+"), re.I | re.S) for t in _TEMPLATES]
    for key, text in _texts_of_set().items():
        for t, rx in zip(_TEMPLATES, templates):
            assert not rx.fullmatch(text.strip()), f"{key} fits the instructions template {t!r}"


def _corpus(name: str) -> list[str]:
    """A training corpus of the shipped drafter (drafters/README.md, drafters/*.sh), as texts;
    skips when its package is not installed."""
    from mtpspec.errors import InputError
    from mtpspec.train import data as D

    try:
        if name == "chitchat":  # the chitchat and chitchat-text recipes; held-out conversations too
            return [m for _, msgs in D._chitchat_conversations() for m in msgs]
        if name == "humaneval":  # problems and reference solutions
            return [p["prompt"] + "\n" + p["canonical_solution"] for p in D._humaneval_problems()]
    except InputError as e:
        pytest.skip(str(e))
    assert name == "python-stdlib"  # the recipe draws from the top-level modules
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    assert files
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.mark.parametrize("corpus", ["chitchat", "humaneval", "python-stdlib"])
def test_no_prompt_comes_from_a_training_corpus(corpus):
    docs = _corpus(corpus)
    texts = _texts_of_set()
    texts.update({f"{p.id}/passage": p.passage for p in _all() if p.passage})
    shared = _shared_runs(texts, docs)
    assert not shared, f"{OVERLAP_WORDS}-word runs shared with {corpus}: {list(shared.items())[:5]}"
    # messages too short to hold such a run: not equal to, nor inside, any text of the corpus
    short = {k: _norm(t) for k, t in texts.items() if len(_words(t)) < OVERLAP_WORDS}
    joined = " " + " | ".join(_norm(d) for d in docs) + " "  # "|" separates texts; words match whole
    for key, s in short.items():
        assert f" {s} " not in joined, f"{key} occurs in {corpus}"


# ---- the loader ----------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: load_category("chat"),
    lambda: load_category("Math"),
    lambda: load_heldout(["math", "chat"]),
    lambda: load_heldout("math,chat"),
])
def test_unknown_category_is_a_value_error_listing_the_valid_names(call):
    with pytest.raises(ValueError, match="unknown held-out category") as e:
        call()
    assert isinstance(e.value, HeldoutError)
    for c in CATEGORIES:
        assert c in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"categories": []}, "no held-out category selected"),
    ({"categories": " , "}, "no held-out category selected"),
    ({"categories": ["math", "coding", "math"]}, "more than once: math"),
    ({"per_category": 0}, "per_category"),
    ({"per_category": True}, "per_category"),
    ({"per_category": 2.0}, "per_category"),
])
def test_bad_selection_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_heldout(**kwargs)


def test_load_heldout_selection_and_order():
    everything = load_heldout()
    assert tuple(everything) == CATEGORIES
    assert all(everything[c] == load_category(c) for c in CATEGORIES)
    assert list(load_heldout("coding, math")) == ["coding", "math"]
    assert list(load_heldout(("stem",))) == ["stem"]
    three = load_heldout(per_category=3)
    assert all(three[c] == load_category(c)[:3] for c in CATEGORIES)
    big = load_heldout(["math"], per_category=10_000)
    assert big["math"] == load_category("math")
    # callers get their own lists
    load_category("math").clear()
    assert len(load_category("math")) >= MIN_PER_CATEGORY


def test_prompt_is_frozen_and_hashable():
    p = load_category("multi_turn")[0]
    with pytest.raises(FrozenInstanceError):
        p.id = "x"  # type: ignore[misc]
    assert len({p, load_category("multi_turn")[0]}) == 1
    c = p.chat()
    c[0]["content"] = "changed"
    assert p.messages[0]["content"] != "changed"
    assert not p.single_turn and load_category("math")[0].single_turn


def test_mean_over_categories_is_unweighted():
    assert mean_over_categories({"math": 2.0, "coding": 3.0, "stem": 4.0}) == pytest.approx(3.0)
    assert mean_over_categories([1.5, 2.5]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        mean_over_categories({})


def test_encode_prompt_renders_the_chat_template(tiny_with_tokenizer):
    import mtpspec

    engine = mtpspec.load(tiny_with_tokenizer)
    tok = engine.tokenizer
    single = load_category("math")[0]
    assert encode_prompt(engine, single) == engine.encode(single.text)
    assert encode_prompt(engine, single, chat=False) == engine.encode(single.text, chat=False)
    multi = load_category("multi_turn")[4]  # "What is 12% of 350?" / "12% of 350 is 42." / ...
    ids = encode_prompt(engine, multi)
    want = tok.apply_chat_template(multi.chat(), add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(want)
    text = tok.decode(ids)
    assert text.startswith("<s>user: What is 12% of 350?\n<s>assistant: 12% of 350 is 42.\n<s>user: ")
    assert text.endswith("<s>assistant:")
    plain = encode_prompt(engine, multi, chat=False)
    assert tok.decode(plain) == "\n\n".join(m["content"] for m in multi.messages)


# ---- packaging -----------------------------------------------------------------------------------
def test_data_files_are_package_data_and_in_the_sdist():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = cfg["tool"]["setuptools"]["package-data"]["mtpspec"]
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8").splitlines()
    for f in sorted(DATA.glob("*.jsonl")) + [DATA / "README.md"]:
        rel = f.relative_to(ROOT / "mtpspec").as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), f"{rel} is not package data in pyproject.toml"
        assert any(ln.split()[:2] == ["recursive-include", "mtpspec/bench/heldout"] and
                   any(fnmatch.fnmatch(f.name, pat) for pat in ln.split()[2:]) for ln in manifest), (
            f"{rel} is not in MANIFEST.in")
