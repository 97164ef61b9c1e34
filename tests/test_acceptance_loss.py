"""The acceptance objective (issue 15 item 4, mtpspec/train/objective.py): the expected accepted
length of each anchor's chain of trained steps, its value and gradient against hand-computed ones
and brute force, the mask semantics on a real unrolled batch, training with it, bad options, and
the objectives comparison script on a tiny target."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mtpspec
from mtpspec.errors import InputError
from mtpspec.models.drafter import DrafterConfig, MTPDrafter
from mtpspec.train import TrainConfig, Trainer
from mtpspec.train.harvest import harvest
from mtpspec.train.objective import (StepOut, acceptance_loss, collate, expected_accepted_length, step_losses,
                                     unroll)

REPO = Path(__file__).resolve().parents[1]

# K = 3 steps, 2 rows x 3 anchors: a[i][b][t] and the trained masks
A = [[[0.9, 0.8, 0.7], [0.6, 0.5, 0.2]],
     [[0.5, 0.25, 0.3], [0.9, 0.5, 0.1]],
     [[0.4, 0.6, 0.2], [0.9, 0.5, 0.3]]]
M = [[[1, 1, 0], [1, 1, 0]],   # (0, 2): step 1 before loss_from; (1, 2): padding
     [[1, 1, 1], [0, 0, 0]],   # (1, 0): the path leaves the target's tokens after step 1
     [[1, 0, 1], [0, 1, 0]]]   # (0, 1): cut after step 2; (1, 1): a trained step after an untrained one


def _brute_force_e(a: list[float]) -> float:
    """E of one chain of n steps by enumerating every accept / reject outcome: accepted length =
    the leading accepts."""
    e = 0.0
    for outcome in itertools.product([True, False], repeat=len(a)):
        prob = math.prod(x if ok else 1 - x for x, ok in zip(a, outcome))
        n = next((i for i, ok in enumerate(outcome) if not ok), len(a))
        e += prob * n
    return e


def test_acceptance_loss_by_hand():
    a = torch.tensor(A, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(M, dtype=torch.bool)
    e, chains = expected_accepted_length(a, mask)
    # anchors with a chain: (0,0) 3 steps, (0,1) 2, (1,0) 1, (1,1) 1 (its step 3 follows an untrained step)
    assert chains.tolist() == [[True, True, False], [True, True, False]]
    want_e = [[0.9 + 0.9 * 0.5 + 0.9 * 0.5 * 0.4, 0.8 + 0.8 * 0.25, 0.0], [0.6, 0.5, 0.0]]
    torch.testing.assert_close(e, torch.tensor(want_e, dtype=torch.float64))
    assert e[0, 0].item() == pytest.approx(1.53) and e[0, 1].item() == pytest.approx(1.0)
    loss = acceptance_loss(a, mask)
    assert loss.item() == pytest.approx(1 - (1.53 + 1.0 + 0.6 + 0.5) / (3 * 4))  # 0.6975
    loss.backward()
    # dE/da_j = sum_{i >= j} prod_{l <= i, l != j} a_l over the chain; dL/da = -dE/da / (K N)
    want = torch.zeros(3, 2, 3, dtype=torch.float64)
    want[:, 0, 0] = torch.tensor([1 + 0.5 + 0.5 * 0.4, 0.9 + 0.9 * 0.4, 0.9 * 0.5])
    want[:2, 0, 1] = torch.tensor([1 + 0.25, 0.8])
    want[0, 1, 0] = want[0, 1, 1] = 1.0
    torch.testing.assert_close(a.grad, -want / 12)


def test_acceptance_loss_matches_brute_force_value_and_gradient():
    """Random chains and masks (prefix cuts, late gaps, empty anchors): value and autograd gradient
    equal those of the enumeration over accept / reject outcomes (float64)."""
    g = torch.Generator().manual_seed(0)
    k = 4
    a = torch.rand(k, 3, 5, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.rand(k, 3, 5, generator=g) < 0.75
    mask[:, 0, 0] = True
    loss = acceptance_loss(a, mask)
    loss.backward()
    a2 = a.detach().clone().requires_grad_()
    total, n = 0.0, 0
    for b in range(3):
        for t in range(5):
            run = 0
            while run < k and mask[run, b, t]:
                run += 1
            if run:
                n += 1
                total = total + _brute_force_enum(a2[:run, b, t])
    want = 1 - total / (k * n)
    want.backward()
    assert 0 < n < 15
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    torch.testing.assert_close(a.grad, a2.grad)


def _brute_force_enum(a: torch.Tensor) -> torch.Tensor:
    """`_brute_force_e` on a tensor (differentiable)."""
    e = a.new_zeros(())
    for outcome in itertools.product([True, False], repeat=a.shape[0]):
        prob = a.new_ones(())
        for x, ok in zip(a, outcome):
            prob = prob * (x if ok else 1 - x)
        e = e + prob * next((i for i, ok in enumerate(outcome) if not ok), a.shape[0])
    return e


def test_brute_force_helpers_agree():
    assert _brute_force_e([0.9, 0.5, 0.4]) == pytest.approx(1.53)
    assert float(_brute_force_enum(torch.tensor([0.8, 0.25], dtype=torch.float64))) == pytest.approx(1.0)


# ---- through the drafter's logits -------------------------------------------------------------------
V, TOPK = 6, 3


def _logit_case(seed: int = 1):
    """Step outputs whose drafter states are the logits themselves (a drafter whose token_logits is
    the identity), with the masks of M, labels, the target's top-3 ids and logits; row 1 holds no
    target logits (a shard without them)."""
    g = torch.Generator().manual_seed(seed)
    outs, zs = [], []
    for i in range(3):
        z = (2 * torch.randn(2, 3, V, generator=g)).requires_grad_()
        topk = torch.stack([torch.randperm(V, generator=g)[:TOPK] for _ in range(6)]).view(2, 3, TOPK)
        labels = topk[..., 0].clone()
        top_logits = torch.sort(3 * torch.randn(2, 3, TOPK, generator=g), dim=-1, descending=True).values
        outs.append(StepOut(z, labels, torch.tensor(M[i], dtype=torch.bool), torch.zeros(2, 3, 4), topk, top_logits))
        zs.append(z)
    batch = SimpleNamespace(soft=torch.tensor([True, False]))
    drafter = SimpleNamespace(token_logits=lambda s, cand: s)
    return drafter, outs, batch, zs


def _losses(drafter, outs, batch, **kw):
    return step_losses(drafter, outs, batch, full_vocab=True, feature_weight=0.0, cluster_of=None, **kw)[0]


@pytest.mark.parametrize("verify", ["greedy", "sampled"])
def test_step_losses_acceptance_value_and_gradient_by_hand(verify):
    """acceptance_weight = 1: the loss is L_acc of a = q(y) (greedy), or a = sum_j min(p_j, q(topk_j))
    on rows with the target's logits (sampled); its gradient with respect to the drafter's logits
    is dL/da * da/dz with da/dz = a (e_y - q) (greedy) or sum_{j: q_j < p_j} q_j (e_j - q)."""
    drafter, outs, batch, zs = _logit_case()
    loss = _losses(drafter, outs, batch, acceptance_weight=1.0, acceptance_verify=verify)
    loss.backward()
    a = torch.zeros(3, 2, 3, dtype=torch.float64)
    dadz = torch.zeros(3, 2, 3, V, dtype=torch.float64)
    for i, o in enumerate(outs):
        for b in range(2):
            for t in range(3):
                q = torch.softmax(o.s[b, t].detach().double(), -1)
                y = int(o.labels[b, t])
                if verify == "sampled" and b == 0:
                    p = torch.softmax(o.topk_logits[b, t].double(), -1)
                    for j, tok in enumerate(o.topk[b, t].tolist()):
                        a[i, b, t] += min(float(p[j]), float(q[tok]))
                        if q[tok] < p[j]:
                            dadz[i, b, t] += q[tok] * (torch.eye(V, dtype=torch.float64)[tok] - q)
                else:
                    a[i, b, t] = q[y]
                    dadz[i, b, t] = q[y] * (torch.eye(V, dtype=torch.float64)[y] - q)
    # hand: E per chain and dL/da (chains as in test_acceptance_loss_by_hand: 4 of them, K = 3)
    e = (a[0, 0, 0] + a[0, 0, 0] * a[1, 0, 0] + a[0, 0, 0] * a[1, 0, 0] * a[2, 0, 0]
         + a[0, 0, 1] + a[0, 0, 1] * a[1, 0, 1] + a[0, 1, 0] + a[0, 1, 1])
    assert loss.item() == pytest.approx(float(1 - e / 12), abs=1e-6)
    dl = torch.zeros(3, 2, 3, dtype=torch.float64)
    dl[0, 0, 0] = 1 + a[1, 0, 0] + a[1, 0, 0] * a[2, 0, 0]
    dl[1, 0, 0] = a[0, 0, 0] + a[0, 0, 0] * a[2, 0, 0]
    dl[2, 0, 0] = a[0, 0, 0] * a[1, 0, 0]
    dl[0, 0, 1], dl[1, 0, 1] = 1 + a[1, 0, 1], a[0, 0, 1]
    dl[0, 1, 0] = dl[0, 1, 1] = 1
    want = -dl[..., None] * dadz / 12
    for i in range(3):
        torch.testing.assert_close(zs[i].grad.double(), want[i], atol=1e-6, rtol=1e-4)


def test_acceptance_weight_mixes_with_the_cross_entropy():
    drafter, outs, batch, zs = _logit_case(2)
    ce = _losses(drafter, outs, batch)
    acc = _losses(drafter, outs, batch, acceptance_weight=1.0)
    mixed = _losses(drafter, outs, batch, acceptance_weight=0.3)
    assert mixed.item() == pytest.approx(0.7 * ce.item() + 0.3 * acc.item(), rel=1e-6)
    grads = [torch.autograd.grad(x, zs) for x in (ce, acc, mixed)]
    for gc, ga, gm in zip(*grads):
        torch.testing.assert_close(gm, 0.7 * gc + 0.3 * ga)
    soft = _losses(drafter, outs, batch, soft_labels=True, acceptance_weight=0.3)  # soft CE + acceptance
    assert soft.item() == pytest.approx(0.7 * _losses(drafter, outs, batch, soft_labels=True).item() + 0.3 * acc.item(),
                                        rel=1e-6)
    for o in outs:  # nothing trained in the batch: no loss, no error
        o.mask = torch.zeros_like(o.mask)
    assert float(_losses(drafter, outs, batch, acceptance_weight=0.5)) == 0.0
    with pytest.raises(InputError, match="acceptance_verify"):
        _losses(drafter, outs, batch, acceptance_weight=0.5, acceptance_verify="typical")
    with pytest.raises(InputError, match="acceptance_weight"):
        _losses(drafter, outs, batch, acceptance_weight=1.5)


# ---- on a real unrolled batch -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_with_tokenizer):
    return mtpspec.load(tiny_with_tokenizer)


def _greedy(target, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = target.forward(torch.tensor([seq]), target.new_cache(1, len(seq) + 1)).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq


@pytest.mark.parametrize("verify", ["greedy", "sampled"])
def test_unrolled_batch_acceptance_matches_per_anchor_brute_force(engine, verify):
    """The loss of a harvested batch (loss_from inside the rows, a row cut off the target's path,
    padding) equals E summed anchor by anchor, each chain walked step by step from its definition:
    it starts at an anchor whose first label is trained and continues while the token fed is the
    target's argmax of the step before and the label is inside the row."""
    target = engine.model
    cfg = DrafterConfig.for_target(target.cfg, num_layers=1, hidden_size=32)
    drafter = MTPDrafter(cfg).init_random(4, std=0.2)
    g = torch.Generator().manual_seed(7)
    row0 = _greedy(target, torch.randint(3, 300, (5,), generator=g).tolist(), 11)
    row1 = _greedy(target, torch.randint(3, 300, (4,), generator=g).tolist(), 8)
    row1[8] = (row1[8] + 1) % 300  # off the target's path from position 8 on
    seqs, froms = [row0, row1], [5, 3]
    acts = harvest(target, seqs, froms, list(dict.fromkeys(cfg.layer_types)), store_dtype=torch.float32)
    batch = collate(acts)
    k = 3
    with torch.no_grad():
        outs = unroll(drafter, target, batch, k)
        loss = step_losses(drafter, outs, batch, full_vocab=False, feature_weight=0.0, cluster_of=None,
                           acceptance_weight=1.0, acceptance_verify=verify)[0]
        cand = torch.unique(torch.cat([batch.topk.flatten(), batch.labels.flatten()]))
        pos = {int(c): j for j, c in enumerate(cand)}
        total, chains = 0.0, 0
        for b, (ids, f) in enumerate(zip(seqs, froms)):
            labels = batch.labels[b]
            for p in range(1, batch.ids.shape[1]):
                if not (p < len(ids) and p + 1 >= f):
                    continue  # no anchor, or its first label is in the prompt
                chains += 1
                e, prod = 0.0, 1.0
                for i in range(1, k + 1):
                    if p + i - 1 >= len(ids) or (i > 1 and ids[p + i - 1] != int(labels[p + i - 2])):
                        break
                    q = torch.softmax(drafter.token_logits(outs[i - 1].s[b, p - 1][None], cand)[0].double(), -1)
                    a = float(q[pos[int(labels[p + i - 1])]])
                    if verify == "sampled":
                        pt = torch.softmax(batch.topk_logits[b, p + i - 1].double(), -1)
                        a = sum(min(float(pt[j]), float(q[pos[int(x)]])) for j, x in enumerate(batch.topk[b, p + i - 1]))
                    prod *= a
                    e += prod
                total += e
    assert loss.item() == pytest.approx(1 - total / (k * chains), rel=1e-5)
    # the case exercises every cut: anchors before loss_from, padding (row 1 is shorter), a path cut
    assert chains < sum(len(s) - 1 for s in seqs)
    m = torch.stack([o.mask for o in outs])
    assert bool((m[0] & ~m[1] & (torch.arange(1, batch.ids.shape[1]) + 1 < batch.lengths[:, None])).any())


# ---- training ----------------------------------------------------------------------------------------
from test_train import _cfg, data_files, run_and_check_it_learns  # noqa: E402,F401  (the training tests' data, settings, check)


def test_training_with_the_acceptance_objective_raises_acceptance(engine, data_files, tmp_path):
    tr = Trainer(_cfg(data_files, tmp_path, max_steps=30, epochs=3, acceptance_weight=0.5,
                      distill_max_new_tokens=16), engine)
    assert tr.objective.acceptance_weight == 0.5 and tr.objective.acceptance_verify == "greedy"
    res = run_and_check_it_learns(tr)
    assert json.loads((res.out / "training.json").read_text())["config"]["acceptance_weight"] == 0.5


def test_bad_acceptance_options_get_clear_errors(engine, data_files, tmp_path, tiny_with_tokenizer):
    from typer.testing import CliRunner

    from mtpspec.cli import app

    for w in (1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(InputError, match=r"acceptance_weight must be in \[0, 1\]"):
            Trainer(_cfg(data_files, tmp_path, acceptance_weight=w), engine)
    with pytest.raises(InputError, match="acceptance_verify must be 'greedy' or 'sampled', got 'typical'"):
        Trainer(_cfg(data_files, tmp_path, acceptance_verify="typical"), engine)
    base = ["train-drafter", "--target", str(tiny_with_tokenizer), "--data", str(data_files / "chat.jsonl"),
            "--out", str(tmp_path / "x")]
    r = CliRunner().invoke(app, base + ["--acceptance-weight", "2"])
    assert r.exit_code == 2 and "acceptance_weight must be in [0, 1]" in r.output
    r = CliRunner().invoke(app, base + ["--acceptance-verify", "nope"])
    assert r.exit_code == 2 and "acceptance_verify must be 'greedy' or 'sampled'" in r.output
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(app, ["train-drafter", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--acceptance-weight" in r.output and "--acceptance-verify" in r.output
    assert "--soft-labels" in r.output


# ---- the comparison script ---------------------------------------------------------------------------
def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_objectives", REPO / "drafters" / "compare_objectives.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_objectives_script_on_a_tiny_target(tiny_with_tokenizer, data_files, tmp_path, capsys):
    mod = _compare_module()
    out = tmp_path / "cmp"
    report = mod.main(["--target", str(tiny_with_tokenizer), "--data", str(data_files / "chat.jsonl"), "--out", str(out),
                       "--arms", "ce,soft,acceptance:0.5,acceptance:1:sampled", "--max-steps", "3", "--shards", "1",
                       "--hidden-size", "32", "--draft-tokens", "2", "--distill-tokens", "8", "--shard-size", "16",
                       "--batch-size", "4", "--categories", "math", "--per-category", "1", "--max-new-tokens", "8",
                       "--quiet"])
    names = ["ce", "soft", "acceptance-0.5", "acceptance-1-sampled"]
    assert [r["arm"] for r in report["arms"]] == names
    assert json.loads((out / "compare_objectives.json").read_text())["best"] == report["best"] in names
    assert report["shards"] == 1
    for r in report["arms"]:
        assert r["steps"] == 3 and r["heldout_tau"] >= 1.0 and len(r["acceptance_per_position"]) == 2
        assert list(r["heldout"]["categories"]) == ["math"]
        assert (out / f"{r['arm']}.work" / "shards").resolve() == (out / "shared.work" / "shards").resolve()
        assert (Path(r["drafter"]) / "model.safetensors").is_file()
    opts = {r["arm"]: r["options"] for r in report["arms"]}
    assert opts["soft"]["soft_labels"] and opts["acceptance-1-sampled"] == {
        "soft_labels": False, "acceptance_weight": 1.0, "acceptance_verify": "sampled"}
    text = capsys.readouterr().out
    assert "held-out tau" in text and "acceptance-0.5" in text and "best" in text
    # fine-tuning arms on an earlier run's shards: linked from --first-shard on, not rebuilt
    src = out / "shared.work" / "shards" / "shard_00000.pt"
    again = mod.main(["--target", str(tiny_with_tokenizer), "--data", str(data_files / "chat.jsonl"),
                      "--out", str(tmp_path / "cmp2"), "--arms", "ce", "--max-steps", "2", "--init", report["arms"][0]["drafter"],
                      "--shards-from", str(out / "shared.work"), "--first-shard", "0", "--hidden-size", "32",
                      "--draft-tokens", "2", "--shard-size", "16", "--batch-size", "4", "--categories", "math",
                      "--per-category", "1", "--max-new-tokens", "8", "--quiet"])
    assert again["shards"] == 1 and again["arms"][0]["steps"] == 2
    assert (tmp_path / "cmp2" / "ce.work" / "shards" / "shard_00000.pt").resolve() == src.resolve()
    with pytest.raises(InputError, match="no shard_"):
        mod.main(["--data", "x", "--out", str(tmp_path / "cmp3"), "--max-steps", "1", "--shards-from", str(out / "shared.work"),
                  "--first-shard", "5"])
    with pytest.raises(InputError, match="unknown arm"):
        mod.parse_arm("kl")
    with pytest.raises(InputError, match="acceptance"):
        mod.parse_arm("acceptance:2")
