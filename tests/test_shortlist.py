"""The shortlist LM head that answers training prompts (train/shortlist.py): exact logits of the
shortlisted tokens and -inf elsewhere, a fitted scorer whose recall is measured, the decoding
loop taking its tokens (greedy or sampled), and the trainer fitting it on the first shard and
answering the next shards with it (never writing prompts with it)."""

from __future__ import annotations

import json

import pytest
import torch
from test_self_instruct import _grow_cfg, engines, family_targets  # noqa: F401  (fixtures)
from test_train import _cfg, data_files, engine  # noqa: F401  (fixtures)

from mtpspec.decoding.loop import Request, decode
from mtpspec.decoding.sampling import SamplingParams
from mtpspec.errors import InputError
from mtpspec.train import Trainer
from mtpspec.train import self_instruct as si
from mtpspec.train.clustering import balanced_kmeans
from mtpspec.train.shortlist import Shortlist, shortlisted


def _head(v=320, h=16, c=10, seed=0):
    w = torch.randn(v, h, generator=torch.Generator().manual_seed(seed))
    return w, balanced_kmeans(w, c)


def _near_tokens(w, n, noise, seed, turn=None):
    """Hidden states near random tokens' weight rows (turned by the matrix `turn` if given)."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(w.shape[0], (n,), generator=g)
    h = 3 * w[tok] + noise * torch.randn(n, w.shape[1], generator=g)
    return h if turn is None else h @ turn


def test_logits_are_exact_on_the_shortlist_and_minus_inf_elsewhere():
    w, order = _head()
    h = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    sl = Shortlist.fit(w, order, h, (h @ w.T).topk(8).indices, n_clusters=10, top_k=3, steps=50)
    for x in (h, h[:7] * -1, h[:3] + 1):  # later calls rewrite the buffer the first returned
        logits, best = sl(x)
        ref = x @ w.T
        ids, _ = sl.candidates(x)
        on = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ids, True)
        assert logits.shape == ref.shape and (on.sum(1) == 3 * 32).all()
        torch.testing.assert_close(logits[on], ref[on])
        assert torch.isneginf(logits[~on]).all()
        assert torch.equal(best, ref.masked_fill(~on, float("-inf")).argmax(-1))
    # tokens that end a sequence are scored at every position, whatever the scorer ranks
    always = torch.tensor([7, 300])
    sl = Shortlist.fit(w, order, h, (h @ w.T).topk(8).indices, n_clusters=10, top_k=1, steps=5, always=always)
    logits, _ = sl(h)
    torch.testing.assert_close(logits[:, always], (h @ w.T)[:, always])
    assert bool(sl.hits(h, torch.full((40,), 300)).all())
    assert sl.to("cpu").always.tolist() == [7, 300]


def test_fit_learns_the_argmax_clusters_and_measures_its_recall():
    w, order = _head(v=320, h=32, c=20)
    # the clusters' mean rows (the scorer's start) rank the argmax's cluster within the top 2 at
    # about half of these positions; fitting on 3200 of them lifts that on the other 800
    turn = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(5)))[0]
    train = _near_tokens(w, 4000, 1.0, seed=2, turn=turn)
    topk = (train @ w.T).topk(8).indices
    kw = dict(n_clusters=20, top_k=2, seed=0)
    fitted, mean_only = Shortlist.fit(w, order, train, topk, **kw), Shortlist.fit(w, order, train, topk, steps=0, **kw)
    assert fitted.recall > mean_only.recall + 0.08, (fitted.recall, mean_only.recall)
    fresh = _near_tokens(w, 2000, 1.0, seed=3, turn=turn)  # the held-out recall predicts other positions'
    assert abs(float(fitted.hits(fresh, (fresh @ w.T).argmax(-1)).float().mean()) - fitted.recall) < 0.04
    # sizes to try: the smallest that reaches min_recall, else the largest
    sizes = dict(n_clusters=20, top_k=(1, 4, 2), seed=0)
    assert Shortlist.fit(w, order, train, topk, min_recall=0.0, **sizes).top_k == 1
    assert Shortlist.fit(w, order, train, topk, min_recall=1.01, **sizes).top_k == 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])  # greedy answers; sampled prompts (a run's later chunks)
def test_decoding_takes_the_shortlists_tokens(engine, temperature):  # noqa: F811
    m = engine.model
    head = m.lm_head
    w = (head.unpacked_weight() if hasattr(head, "unpacked_weight") else head.weight).detach().float()
    c, hdim = 10, w.shape[1]
    order = balanced_kmeans(w, c)
    prompts = ([5, 9, 33, 7], [40, 41, 42], list(range(3, 20)))
    reqs = lambda: [Request(p, 12, params=SamplingParams(temperature, seed=i))  # noqa: E731
                    for i, p in enumerate(prompts)]
    plain = [s.new_ids for s in decode(m, reqs(), slots=2)]
    every = Shortlist(w[order].view(c, -1, hdim).contiguous(), order, torch.zeros(c, hdim), torch.zeros(c), top_k=c)
    with shortlisted(m, every):  # every cluster shortlisted: plain decoding, the same samples
        assert [s.new_ids for s in decode(m, reqs(), slots=2)] == plain
    assert m.head_shortlist is None
    bias = torch.zeros(c)
    bias[3] = 1e4  # the scorer always ranks cluster 3 first: every token comes from it
    one = Shortlist(every.weight, order, torch.zeros(c, hdim), bias, top_k=1)
    with shortlisted(m, one):
        out = [s.new_ids for s in decode(m, reqs(), slots=2)]
    cluster3 = set(order.view(c, -1)[3].tolist())
    assert all(t in cluster3 for ids in out for t in ids) and out != plain


def test_trainer_answers_later_shards_with_a_shortlist_fitted_on_the_first(engine, data_files, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    monkeypatch.setattr("mtpspec.train.trainer.MIN_RECALL", 0.0)  # a tiny random target: any recall will do
    fit, seen = Shortlist.fit, []

    def fit_then_force_cluster_3(*args, **kwargs):  # so that the answers show which head wrote them
        sl = fit(*args, **kwargs)
        seen.append((args[2].shape[0], sl.recall))
        sl.scorer.zero_()
        sl.bias.zero_()
        sl.bias[3] = 1e4
        return sl

    monkeypatch.setattr(Shortlist, "fit", fit_then_force_cluster_3)
    kw = dict(max_steps=6, eval_prompts=None, clustered=True, num_centroids=10, centroid_top_k=4)
    tr = Trainer(_cfg(data_files, tmp_path, **kw), engine)  # on by default with a clustered head
    tr.run()
    sl = tr._shortlist
    first = tr.shards.loaded[0]  # fitted once, on the first shard's labelled positions
    assert seen == [(sum(len(a) - a.loss_from + 1 for a in first), sl.recall)]
    assert isinstance(sl, Shortlist) and sl.top_k == 1 and 0 <= sl.recall <= 1  # 10 // 64 -> 1 cluster of 10
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "drafter.work" / "shards").glob("*.json"))]
    assert len(metas) >= 2 and "answer_head" not in metas[0]  # the first shard: the full head
    assert metas[1]["answer_head"] == {"shortlist_clusters": 1, "clusters": 10, "heldout_recall": sl.recall}
    cluster3 = set(sl.order.view(10, -1)[3].tolist())
    chosen = lambda shard: [t for a in shard for t in a.labels[a.loss_from - 1:].tolist()]  # noqa: E731
    assert not set(chosen(first)) <= cluster3  # the full head's answers
    stops = set(tr._stop_tokens())  # scored at every position: answers (and prompts) can end
    assert set(sl.always.tolist()) == stops and set(engine.eos_ids) <= stops
    assert set(chosen(tr.shards.loaded[1])) <= cluster3 | stops  # the shortlist's
    off = Trainer(_cfg(data_files, tmp_path / "off", answer_shortlist=False, **kw), engine)
    off.run()
    assert off._shortlist is None
    full = Trainer(_cfg(data_files, tmp_path / "full", max_steps=2, eval_prompts=None), engine)  # full head: off
    full.run()
    assert full._shortlist is None
    with pytest.raises(InputError, match="clustered"):
        Trainer(_cfg(data_files, tmp_path / "bad", answer_shortlist=True, max_steps=1), engine)


def test_prompts_are_written_with_the_full_head(engines, tmp_path, monkeypatch):  # noqa: F811
    """Prompts the target writes (sampled), later chunks too, come from its full LM head even when
    shards are answered with the shortlist (fitted on greedy answers, it would truncate the
    distribution they are sampled from)."""
    monkeypatch.setattr("mtpspec.train.trainer.MIN_RECALL", 0.0)  # a tiny random target: any recall will do
    heads, real = [], si.generate_prompts

    def record(model, *a, **k):
        heads.append((k["seed"], model.head_shortlist))
        return real(model, *a, **k)

    monkeypatch.setattr(si, "generate_prompts", record)
    kw = dict(clustered=True, num_centroids=10, centroid_top_k=4, answer_shortlist=True)
    eng = engines["llama"]
    t = Trainer(_grow_cfg(tmp_path, **kw), eng)
    t.run()
    assert isinstance(t._shortlist, Shortlist)
    assert heads == [(0, None), (1, None), (2, None)]
