"""Scores on the broad held-out benchmark (issue 15): `eval-drafter --heldout` and `bench --suite spec
--heldout` report tau per category (the category's mean accepted length over all its verification
rounds) and the unweighted mean over categories. Checked against values aggregated by hand from the
per-sequence statistics of the decoding runs, on a tiny random target with a tiny drafter."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from drafter_helpers import copying_drafter
from tiny_models import save_tiny_tokenizer, tiny_hf_model
from typer.testing import CliRunner

import mtpspec
from mtpspec.bench.heldout import CATEGORIES, encode_prompt, load_heldout
from mtpspec.bench.heldout_scores import category_record, category_totals, heldout_prompts, heldout_run_record
from mtpspec.cli import app
from mtpspec.errors import InputError

SELECTION = ["math", "multi_turn", "coding"]  # short prompts (the tiny tokenizer spends ~1 token per byte)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny Qwen2 with a tokenizer, a chat template and room for the multi-turn prompts (with the
    copying drafter below its categories score differently: no single token repeated forever)."""
    folder = tmp_path_factory.mktemp("heldout-target")
    tiny_hf_model("qwen2", max_position_embeddings=2048).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def drafter(target, tmp_path_factory):
    """An MTP drafter that drafts repeats of its input token (random targets repeat themselves at
    times, so some drafts get accepted)."""
    from mtpspec.drafter_checkpoint import save_drafter

    folder = tmp_path_factory.mktemp("heldout-drafter") / "d"
    save_drafter(copying_drafter(mtpspec.load(target).model), folder, draft_tokens=3)
    return folder


def _hand(stats) -> dict:
    """Tau and per-position acceptance of a list of per-sequence stats, summed by hand."""
    rounds = sum(s.rounds for s in stats)
    tokens = sum(s.round_tokens for s in stats)
    width = max((len(s.proposed_per_position) for s in stats), default=0)
    prop = [sum(s.proposed_per_position[i] for s in stats if i < len(s.proposed_per_position)) for i in range(width)]
    acc = [sum(s.accepted_per_position[i] for s in stats if i < len(s.accepted_per_position)) for i in range(width)]
    return {"prompts": len(stats), "rounds": rounds, "tau": tokens / rounds if rounds else None,
            "acceptance": [a / p if p else None for a, p in zip(acc, prop)]}


def _check_category(got: dict, want: dict, k: int) -> None:
    assert got["prompts"] == want["prompts"] and got["rounds"] == want["rounds"]
    assert got["mean_accepted_length"] == round(want["tau"], 4)
    acc = (want["acceptance"] + [None] * k)[:k]
    assert got["acceptance_per_position"] == [None if a is None else round(a, 4) for a in acc]


def _counts(rounds: int, tokens: int, proposed: list[int], accepted: list[int]):
    return SimpleNamespace(rounds=rounds, round_tokens=tokens, proposed_per_position=proposed,
                           accepted_per_position=accepted, draft_time=0.0, decode_time=1.0)


# ---- the record ----------------------------------------------------------------------------------
def test_category_record_sums_counts_and_averages_categories_unweighted():
    rows = [("math", _counts(10, 30, [10, 10], [8, 6])),       # math: 30 + 4 tokens / 12 rounds
            ("coding", _counts(20, 20, [20, 20], [0, 0])),     # coding: 20 + 60 tokens / 50 rounds
            ("math", _counts(2, 4, [2, 2], [1, 1])),
            ("coding", _counts(30, 60, [30, 30], [20, 10]))]
    rec = category_record(category_totals(rows, ["coding", "math", "stem"]), k=3)
    assert list(rec["categories"]) == ["coding", "math", "stem"]  # the given order; stem: no rows
    assert rec["categories"]["math"] == {"prompts": 2, "rounds": 12, "mean_accepted_length": round(34 / 12, 4),
                                         "acceptance_per_position": [0.75, round(7 / 12, 4), None]}
    assert rec["categories"]["coding"]["mean_accepted_length"] == round(80 / 50, 4)
    assert rec["categories"]["stem"]["mean_accepted_length"] is None
    assert rec["mean_over_categories"] is None  # a category without a round has no tau
    del rows[1::2]
    rec = category_record(category_totals(rows + [("coding", _counts(50, 80, [1], [1]))]))
    assert rec["mean_over_categories"] == round((34 / 12 + 80 / 50) / 2, 4)  # unweighted, not (34+80)/62
    assert rec["mean_over_categories"] != round((34 + 80) / 62, 4)


def test_run_record_maps_rows_to_prompts_and_counts_complete_passes():
    """Row j of a run ran prompt j % n; the partial pass that only fills the last batch is left out."""
    cats = ["math", "math", "coding"]
    stats = [_counts(1, 1 + j, [1], [min(j, 1)]) for j in range(8)]  # 8 rows: 2 complete passes of 3
    runs = [SimpleNamespace(stats=stats), SimpleNamespace(stats=stats[:3])]
    rec = heldout_run_record(runs, cats)
    math = [stats[j] for j in (0, 1, 3, 4)] + stats[:2]
    coding = [stats[2], stats[5], stats[2]]
    for name, want in (("math", math), ("coding", coding)):
        _check_category(rec["categories"][name], _hand(want), 1)
    assert rec["mean_over_categories"] == round((_hand(math)["tau"] + _hand(coding)["tau"]) / 2, 4)


# ---- eval-drafter --heldout ----------------------------------------------------------------------
def _spy_decode(monkeypatch) -> list:
    import mtpspec.decoding.loop as loop

    calls, real = [], loop.decode

    def decode(model, requests, plan=None, slots=None):
        seqs = real(model, requests, plan, slots)
        calls.append((requests, seqs))
        return seqs

    monkeypatch.setattr(loop, "decode", decode)
    return calls


def test_eval_drafter_heldout_per_category(target, drafter, monkeypatch):
    calls = _spy_decode(monkeypatch)
    r = CliRunner().invoke(app, ["eval-drafter", str(drafter), "--target", str(target), "--heldout",
                                 "--categories", ",".join(SELECTION), "--per-category", "2", "-n", "12", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    (ev,) = res["evaluations"]
    assert ev["prompts_file"] is None and ev["prompts"] == 6 and res["draft_tokens"] == 3
    # the prompts ran, rendered with the chat template (multi-turn conversations whole)
    (requests, seqs), = calls
    prompts = [p for c in SELECTION for p in load_heldout([c], 2)[c]]
    engine = mtpspec.load(target)
    assert [q.prompt_ids for q in requests] == [encode_prompt(engine, p) for p in prompts]
    # per category: the counts of its sequences summed by hand; headline: the unweighted mean
    per_cat = ev["heldout"]["categories"]
    assert list(per_cat) == SELECTION  # --categories filters, in the order given
    hand = {c: _hand([s.stats for p, s in zip(prompts, seqs) if p.category == c]) for c in SELECTION}
    for c in SELECTION:
        _check_category(per_cat[c], hand[c], 3)
    assert ev["heldout"]["mean_over_categories"] == round(sum(h["tau"] for h in hand.values()) / 3, 4)
    pooled = _hand([s.stats for s in seqs])
    assert ev["mean_accepted_length"] == round(pooled["tau"], 4)
    # the data discriminate: categories score differently, the unweighted mean is not the pooled one
    assert len({h["tau"] for h in hand.values()}) == 3 and pooled["rounds"] != 3 * hand["math"]["rounds"]
    assert abs(ev["heldout"]["mean_over_categories"] - ev["mean_accepted_length"]) > 1e-3

    r = CliRunner().invoke(app, ["eval-drafter", str(drafter), "--target", str(target), "--heldout",
                                 "--categories", "math,coding", "--per-category", "1", "-n", "8"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("held-out benchmark, 2 categories (2 prompts"))
    assert lines[i + 1].split()[:4] == ["category", "prompts", "rounds", "tau"]
    assert [ln.split()[0] for ln in lines[i + 2 : i + 4]] == ["math", "coding"]
    assert lines[i + 4].strip().startswith("mean over categories")


@pytest.mark.parametrize("args, wants", [
    (["--heldout", "--categories", "math,poetry"], ["unknown held-out category 'poetry'", *CATEGORIES]),
    (["--categories", "math"], ["add --heldout"]),
    (["--per-category", "2"], ["add --heldout"]),
    ([], ["--prompts-file", "--heldout"]),
    (["--heldout", "--per-category", "0"], ["per_category"]),
])
def test_eval_drafter_heldout_bad_selection(args, wants, tmp_path):
    """Checked before anything is loaded (the drafter folder does not even exist)."""
    r = CliRunner().invoke(app, ["eval-drafter", str(tmp_path / "no-drafter"), *args])
    assert r.exit_code == 2, r.output
    assert "mtpspec: error:" in r.output
    for w in wants:
        assert w in r.output


# ---- bench --suite spec --heldout ----------------------------------------------------------------
def test_spec_bench_heldout_per_category(target, drafter, monkeypatch, tmp_path, capsys):
    import mtpspec.bench.spec as spec

    got_runs, real = [], spec.interleave
    monkeypatch.setattr(spec, "interleave", lambda *a, **kw: got_runs.append(real(*a, **kw)) or got_runs[-1])
    prompts = heldout_prompts("math,multi_turn", per_category=2)  # 4 prompts; at batch 3: 6 rows, 2 refill
    res = spec.run_spec_bench(model=target, drafter=drafter, batch_sizes=(1, 3), draft_tokens="2,adaptive",
                              modes=("greedy",), max_new_tokens=10, repeats=2, cost_repeats=2, prompts=prompts,
                              transformers_assisted=False, out=tmp_path / "spec.json", plot=None)
    data = json.loads((tmp_path / "spec.json").read_text())
    assert data["prompts"] == "heldout" and "heldout" in data["notes"]
    assert data["arguments"]["prompts"] == [p.id for p in prompts] and data["arguments"]["num_prompts"] == 4
    assert res["greedy_tokens_identical"] is True
    assert [(r["batch_size"], r["k"]) for r in data["runs"]] == [(1, "2"), (1, "adaptive"), (3, "2"), (3, "adaptive")]
    for row, (_, got) in zip(data["runs"], [g for g in got_runs for _ in (0, 1)]):
        runs = got[f"spec_{row['k']}"]
        assert len(runs) == 2 and all(len(run.stats) == (4 if row["batch_size"] == 1 else 6) for run in runs)
        hand = {c: _hand([run.stats[j] for run in runs for j in range(4) if prompts[j].category == c])
                for c in ("math", "multi_turn")}
        assert list(row["heldout"]["categories"]) == ["math", "multi_turn"]
        for c, h in hand.items():
            _check_category(row["heldout"]["categories"][c], h, len(h["acceptance"]))
        assert row["heldout"]["mean_over_categories"] == round((hand["math"]["tau"] + hand["multi_turn"]["tau"]) / 2, 4)
    assert any(len({c["mean_accepted_length"] for c in r["heldout"]["categories"].values()}) == 2
               for r in data["runs"])  # the categories score differently: the check discriminates
    printed = capsys.readouterr().out
    assert "held-out benchmark: tau" in printed and "mean over categories" in printed and "multi_turn" in printed


def test_spec_bench_heldout_needs_every_prompt(target):
    from mtpspec.bench.spec import run_spec_bench

    with pytest.raises(InputError, match="num_prompts 3 < the 4 held-out prompts"):
        run_spec_bench(model=target, drafter="ngram", prompts=heldout_prompts("math,coding", 2), num_prompts=3,
                       out=None, plot=None)
    with pytest.raises(InputError, match="cannot be mixed"):
        run_spec_bench(model=target, drafter="ngram", prompts=heldout_prompts("math", 1) + ["hello"], out=None, plot=None)


def test_bench_cli_heldout(target, tmp_path):
    out = tmp_path / "spec.json"
    r = CliRunner().invoke(app, ["bench", "--suite", "spec", "--model", str(target), "--drafter", "ngram", "--heldout",
                                 "--categories", "coding,math", "--per-category", "1", "-k", "2", "--batch-sizes", "2",
                                 "--modes", "greedy", "--repeats", "1", "-n", "6", "--no-transformers",
                                 "--out", str(out), "--plot", str(tmp_path / "spec.png")])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(out.read_text())["runs"]
    assert list(row["heldout"]["categories"]) == ["coding", "math"]
    taus = [c["mean_accepted_length"] for c in row["heldout"]["categories"].values()]
    assert row["heldout"]["mean_over_categories"] == pytest.approx(sum(taus) / 2, abs=1e-4)
    assert "mean over categories" in r.output


@pytest.mark.parametrize("args, wants", [
    (["--suite", "spec", "--heldout", "--categories", "math,poetry"], ["unknown held-out category 'poetry'", *CATEGORIES]),
    (["--suite", "plain", "--heldout"], ["--heldout is for --suite spec"]),
    (["--suite", "spec", "--categories", "math"], ["add --heldout"]),
    (["--suite", "spec", "--heldout", "--prompts-file", "x.txt"], ["not both"]),
])
def test_bench_cli_heldout_bad_selection(args, wants, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("hi\n")
    r = CliRunner().invoke(app, ["bench", *args, "--out-dir", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    for w in wants:
        assert w in r.output
