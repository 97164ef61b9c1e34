"""Draft trees: the tree mask, tree verification, KV compaction, and losslessness of tree
speculative decoding (controlled trees and real MTP drafting) against plain greedy decoding,
across families, batch sizes, prompt lengths and the sliding window."""

from __future__ import annotations

import pytest
import torch

from drafter_helpers import random_drafter
from mtpspec.cache import CacheLayout, KVCache
from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.loop import Request, decode
from mtpspec.decoding.mtp import MtpProposer, TreeShape
from mtpspec.decoding.plan import AUTO_TREE, DraftPlan
from mtpspec.decoding.proposers import DraftInput, Proposal
from mtpspec.decoding.sampling import SamplingParams
from mtpspec.decoding.tree import TreeMask, verify_greedy_tree, verify_sampled_tree_row
from mtpspec.decoding.verify import verify_greedy
from mtpspec.errors import InputError
from sampling_helpers import SMALL_V, exact_token_distribution
from tiny_models import VOCAB

NEW = 40  # with the prompts, crosses the Gemma 3 tiny model's sliding window (8)


# ---- the tree itself -----------------------------------------------------------------------------


def test_tree_mask_from_parents():
    #        root
    #       /    \
    #      1      2
    #     / \      \
    #    3   4      5
    parents = torch.tensor([[0, 0, 1, 1, 2]])
    tree = TreeMask.from_parents(parents)
    assert tree.depth.tolist() == [[0, 1, 1, 2, 2, 2]]
    ancestors = {i: [j for j in range(6) if tree.visible[0, i, j]] for i in range(6)}
    assert ancestors == {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 2, 5]}


def _logits_with_argmax(argmax: list[list[int]], vocab: int = 10) -> torch.Tensor:
    out = torch.zeros(len(argmax), len(argmax[0]), vocab)
    for b, row in enumerate(argmax):
        for i, t in enumerate(row):
            out[b, i, t] = 1.0
    return out


def test_verify_greedy_tree_follows_the_targets_choice_through_siblings():
    # nodes 1..5 = tokens 4, 6, 7, 8, 9 with the tree of test_tree_mask_from_parents
    tokens = torch.tensor([[4, 6, 7, 8, 9]] * 3)
    parents = torch.tensor([[0, 0, 1, 1, 2]] * 3)
    logits = _logits_with_argmax([
        [6, 0, 9, 0, 0, 3],  # root -> 6 (node 2), node 2 -> 9 (node 5), node 5 -> 3: bonus
        [4, 8, 0, 0, 0, 0],  # root -> 4 (node 1), node 1 -> 8 (node 4), node 4 -> 0: bonus
        [5, 0, 0, 0, 0, 0],  # root -> 5: no child has it; 5 is the bonus
    ])
    paths, emitted = verify_greedy_tree(tokens, parents, logits)
    assert paths == [[2, 5], [1, 4], []]
    assert emitted == [[6, 9, 3], [4, 8, 0], [5]]


def test_a_chain_tree_verifies_like_a_chain():
    g = torch.Generator().manual_seed(0)
    drafts = torch.randint(0, 5, (6, 4), generator=g)
    logits = torch.randn(6, 5, 5, generator=g)
    n, toks = verify_greedy(drafts, logits)
    chain_parents = torch.arange(4).expand(6, 4)  # node i's parent is node i-1
    paths, emitted = verify_greedy_tree(drafts, chain_parents, logits)
    assert [len(p) for p in paths] == n.tolist()
    assert emitted == [toks[b, : n[b] + 1].tolist() for b in range(6)]


def test_compact_moves_the_accepted_path_and_sets_lengths():
    # three layers in two layouts (as Gemma 4's sliding / full layers): compaction moves each group at once
    layouts = {0: CacheLayout(1, 2), 1: CacheLayout(2, 4), 3: CacheLayout(1, 2)}
    full = KVCache(layouts, batch_size=4, capacity=12, dtype=torch.float32, device="cpu")
    assert len(full.groups) == 2 and full.k[3].data_ptr() == full.groups[0][0][1].data_ptr()
    cache = full.rows(1, 4)  # a view of rows 1..3, as the decoding loop uses
    for layer in layouts:
        for i, t in enumerate((cache.k[layer], cache.v[layer])):  # entry value = its slot (+ 100 layer + 1000 for v)
            t.copy_((torch.arange(12.0) + 100 * layer + 1000 * i).view(1, 1, 12, 1).expand_as(t))
    base = torch.tensor([2, 5, 3])
    cache.compact(base, [[0, 2, 5], [0, 1], []])
    assert cache.lengths.tolist() == [5, 7, 3] and full.lengths.tolist() == [0, 5, 7, 3]
    for layer in layouts:
        assert cache.k[layer][0, -1, 2:5, -1].tolist() == [100 * layer + s for s in (2.0, 4.0, 7.0)]  # slots 2+0, 2+2, 2+5
        assert cache.v[layer][0, 0, 2:5, 0].tolist() == [1000 + 100 * layer + s for s in (2.0, 4.0, 7.0)]
        assert cache.v[layer][1, 0, 5:7, 0].tolist() == [1005.0 + 100 * layer, 1006.0 + 100 * layer]  # already in place
        assert cache.k[layer][0, 0, :2, 0].tolist() == [100 * layer + 0.0, 100 * layer + 1.0]  # the prefix is untouched
        assert cache.k[layer][2, 0, :, 0].tolist() == [100 * layer + s for s in range(12)]  # the empty path moves nothing
        assert full.k[layer][0].abs().sum() == 0  # rows outside the view are untouched


# ---- the target forward over a tree ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def target(request, tiny_checkpoints):
    return load_decoder(tiny_checkpoints[request.param][0])


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _forward_on(model, prompts, tokens, tree=None):
    cache = model.new_cache(len(prompts), 64)
    for b, p in enumerate(prompts):  # prefill rows one by one: ragged lengths
        view = cache.rows(b, b + 1)
        model(torch.tensor([p]), view)
    return model(tokens, cache, tree=tree), cache


def test_tree_forward_equals_the_forward_of_each_path(target):
    """Every node's logits equal those of a plain forward over its root-to-node path, for ragged
    rows, one of them long enough for a node to sit past the sliding window."""
    prompts = [_prompt(4, 1), _prompt(9, 2)]
    parents = torch.tensor([[0, 0, 1, 1, 2, 3, 6], [0, 1, 0, 2, 3, 5, 5]])
    tokens = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    tree = TreeMask.from_parents(parents)
    out, cache = _forward_on(target, prompts, tokens, tree)
    assert cache.lengths.tolist() == [4 + 8, 9 + 8]
    for b in range(2):
        for i in range(8):
            path = [j for j in range(8) if tree.visible[b, i, j]]
            ref, _ = _forward_on(target, [prompts[b]], tokens[b : b + 1, path])
            torch.testing.assert_close(out.logits[b, i], ref.logits[0, -1], atol=1e-4, rtol=1e-4)


# ---- losslessness through the decoding loop -----------------------------------------------------


class ReferenceTreeProposer:
    """Draft trees around the greedy reference continuation: every node gets `width` children,
    one of them the reference token (at a random sibling place) unless `corrupt` strikes; the
    reference path is the only one followed below depth 1. corrupt=0: always accepted in full,
    corrupt=1: never."""

    def __init__(self, references, corrupt: float = 0.0, width: int = 3, seed: int = 0):
        self.refs, self.corrupt, self.width = references, corrupt, width
        self.gen = torch.Generator().manual_seed(seed)

    def max_tokens(self, k: int) -> int:
        return k * self.width

    def propose(self, inp: DraftInput, k: int) -> Proposal:
        rows_t, rows_p = [], []
        for b, hist in enumerate(inp.history):
            ref = self.refs[b]
            n = len(hist)
            assert hist == ref[:n], "history diverged from the greedy reference: output is not lossless"
            follow = ref[n : n + k] + [0] * max(0, n + k - len(ref))
            toks, pars, parent = [], [], 0
            for i in range(k):
                right = int(torch.randint(self.width, (), generator=self.gen))
                keep = float(torch.rand((), generator=self.gen)) >= self.corrupt
                nxt_parent = None
                for j in range(self.width):
                    if j == right and keep:
                        toks.append(follow[i])
                        nxt_parent = len(toks)
                    else:  # a decoy: any token but the reference one
                        toks.append((follow[i] + 1 + int(torch.randint(VOCAB - 1, (), generator=self.gen))) % VOCAB)
                    pars.append(parent)
                parent = nxt_parent if nxt_parent is not None else len(toks)  # follow a decoy if struck
            rows_t.append(toks)
            rows_p.append(pars)
        return Proposal(torch.tensor(rows_t), parents=torch.tensor(rows_p))


def _prompts(batch: int) -> list[list[int]]:
    lens = [11] if batch == 1 else [5, 13, 2, 9, 17]
    return [_prompt(n, 30 + i) for i, n in enumerate(lens)]


def _plain(model, ps, new=NEW):
    return [s.new_ids for s in decode(model, [Request(p, new) for p in ps])]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("corrupt", [0.0, 1.0, 0.4])
def test_tree_speculative_equals_plain(target, corrupt, k, batch):
    ps = _prompts(batch)
    ref = _plain(target, ps)
    full = [p + r for p, r in zip(ps, ref)]
    seqs = decode(target, [Request(p, NEW) for p in ps], DraftPlan(ReferenceTreeProposer(full, corrupt, seed=k), k))
    assert [s.new_ids for s in seqs] == ref
    for s in seqs:
        st = s.stats
        assert st.target_forwards == st.rounds + 1
        if corrupt == 0.0:  # the reference path is always in the tree: k+1 tokens per round
            assert st.rounds == -(-(NEW - 1) // (k + 1))
            assert all(a == 1.0 for a in st.acceptance_per_position)
        if corrupt == 1.0:
            assert st.mean_accepted_length == 1.0
        if corrupt == 0.4 and k > 1:
            assert 1.0 < st.mean_accepted_length < k + 1


def test_rows_cut_inside_an_accepted_tree_path_stay_consistent(target):
    """Different budgets and an EOS inside accepted paths: each row equals its plain run."""
    ps = _prompts(5)
    ref = _plain(target, ps)
    full = [p + r for p, r in zip(ps, ref)]
    budgets = [3, 17, 8, 40, 1]
    eos = frozenset({ref[3][12]})
    reqs = lambda: [Request(p, n, eos_ids=eos) for p, n in zip(ps, budgets)]  # noqa: E731
    want = [s.new_ids for s in decode(target, reqs())]
    got = [s.new_ids for s in decode(target, reqs(), DraftPlan(ReferenceTreeProposer(full, 0.2, seed=5), 5))]
    assert got == want


# ---- real MTP drafting with trees ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [TreeShape(6, 2, 3), TreeShape(16, 4, 4), TreeShape(3, 1, 1)])
def test_mtp_tree_drafting_equals_plain(target, shape):
    drafter = random_drafter(target, seed=7)
    for batch in (1, 5):
        ps = _prompts(batch)
        ref = _plain(target, ps, 24)
        for k in (1, 4):
            seqs = decode(target, [Request(p, 24) for p in ps], DraftPlan(MtpProposer(drafter), k, draft_tree=shape))
            assert [s.new_ids for s in seqs] == ref, (shape, batch, k)


def test_mtp_trees_hold_the_drafters_best_paths(target):
    """The tree's depth-1 nodes are the drafter's top tokens; the chain it would draft greedily
    is one of the tree's paths (beam >= 1 always expands the best node)."""
    drafter = random_drafter(target, seed=3)
    ps = _prompts(5)
    from drafter_helpers import our_drafts

    chain, inp = our_drafts(target, drafter, ps, 3)
    tree = MtpProposer(drafter).propose(inp, 3, TreeShape(nodes=40, beam=2, branch=3))
    assert tree.parents is not None and tree.tokens.shape == (5, 3 + 2 * 3 * 2)  # all candidates kept
    for b in range(5):
        toks, pars = tree.tokens[b].tolist(), tree.parents[b].tolist()
        node, path = 0, []
        for want in chain.tokens[b].tolist():
            node = next(i + 1 for i, (t, p) in enumerate(zip(toks, pars)) if p == node and t == want)
            path.append(node)
        assert len(path) == 3
        assert all(p < i + 1 for i, p in enumerate(pars))  # parents precede their children


def test_mixed_batches_draft_trees_greedy_rows_exact_sampled_rows_reproducible(target):
    drafter = random_drafter(target, seed=5)
    ps = _prompts(5)
    ref = _plain(target, ps, 16)
    params = [SamplingParams(), SamplingParams(0.8, seed=1), SamplingParams(), SamplingParams(), SamplingParams(1.0, seed=2)]
    reqs = lambda: [Request(p, 16, q) for p, q in zip(ps, params)]  # noqa: E731
    plan = DraftPlan(MtpProposer(drafter), 3, draft_tree=TreeShape(8))
    a, b = decode(target, reqs(), plan), decode(target, reqs(), plan)
    assert [s.new_ids for s in a] == [s.new_ids for s in b]  # seeded rows draw the same tokens
    assert [a[i].new_ids for i in (0, 2, 3)] == [ref[i] for i in (0, 2, 3)]
    assert all(len(s.new_ids) == 16 for s in a)


def test_tree_shape_parsing_and_errors():
    assert TreeShape.parse("12") == TreeShape(12, 4, 4)
    assert TreeShape.parse("10:2:5") == TreeShape(10, 2, 5)
    for bad in ("", "x", "1:2:3:4", "0", "8:0", "8:2:-1"):
        with pytest.raises(InputError, match="draft tree"):
            TreeShape.parse(bad)


@pytest.mark.parametrize("name", ["e2b", "26b-a4b"])
def test_mtp_tree_drafting_equals_plain_on_gemma4(name, tmp_path):
    """Gemma 4: KV-shared layers read their source layer's tree slots through the same mask; MoE
    routes every node; generation crosses the sliding window."""
    from drafter_helpers import tiny_target

    _, target = tiny_target(name, tmp_path)
    drafter = random_drafter(target, seed=4)
    ps = _prompts(5)[:3]
    ref = _plain(target, ps, 20)
    seqs = decode(target, [Request(p, 20) for p in ps], DraftPlan(MtpProposer(drafter), 3, draft_tree=TreeShape(8, 2, 3)))
    assert [s.new_ids for s in seqs] == ref


def test_auto_tree_switches_between_chains_and_trees_within_a_batch(target):
    """draft_tree="auto": chains while two rows decode, the AUTO_TREE once the sampled row decodes
    alone (its greedy neighbour finished first) in the same batch; the greedy row equals plain
    decoding, and trees for a row that started with chains keep the cache consistent (conftest)."""
    drafter = random_drafter(target, seed=6)
    ps = _prompts(5)[:2]
    asked = []

    class Spy(MtpProposer):
        def propose(self, inp, k, tree=None):
            asked.append((sum(inp.active), tree))
            return super().propose(inp, k, tree)

    got = decode(target, [Request(ps[0], 6), Request(ps[1], 20, SamplingParams(0.8, seed=1))],
                 DraftPlan(Spy(drafter), 3))
    assert got[0].new_ids == _plain(target, ps[:1], 6)[0] and len(got[1].new_ids) == 20
    assert {t for n, t in asked if n == 2} == {None} and {t for n, t in asked if n == 1} == {AUTO_TREE}


# ---- sampling over trees -------------------------------------------------------------------------

class RandomTreeProposer:
    """A random tree of `nodes` tokens over a small vocabulary (random parents, distinct siblings),
    the same one every round: candidates that sometimes hold likely tokens and sometimes not."""

    def __init__(self, nodes: int = 6, seed: int = 0):
        self.nodes, self.seed = nodes, seed

    def max_tokens(self, k: int) -> int:
        return self.nodes

    def propose(self, inp: DraftInput, k: int) -> Proposal:
        gen = torch.Generator().manual_seed(self.seed + k)
        toks, pars, depth = [], [], [0]
        for j in range(self.nodes):
            options = [i for i in range(j + 1) if depth[i] < k]
            par = options[int(torch.randint(len(options), (), generator=gen))]
            taken = {t for t, p in zip(toks, pars) if p == par}
            free = [t for t in range(SMALL_V) if t not in taken]
            toks.append(free[int(torch.randint(len(free), (), generator=gen))])
            pars.append(par)
            depth.append(depth[par] + 1)
        b = len(inp.history)
        return Proposal(torch.tensor([toks] * b), parents=torch.tensor([pars] * b))


def _empirical(model, prompt, params, n, proposer, k):
    """Frequencies of the second and third generated tokens."""
    reqs = [Request(prompt, 4, SamplingParams(params.temperature, params.top_k, params.top_p, seed=i)) for i in range(n)]
    seqs = decode(model, reqs, DraftPlan(proposer, k), slots=500)
    return [torch.bincount(torch.tensor([s.new_ids[i] for s in seqs]), minlength=SMALL_V).float() / n for i in (1, 2)]


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(1.2, top_p=0.8)], ids=["temperature", "top_p"])
def test_tree_sampling_matches_target_distribution(small_vocab_target, params, monkeypatch):
    """The third token (reached through accepted tree nodes, siblings and bonus draws) follows the
    target's distribution; a verifier biased towards the tree's candidates is caught."""
    model, prompt, n = small_vocab_target, [3, 5, 7, 3, 5], 6000
    exact = [exact_token_distribution(model, prompt, params, i) for i in (1, 2)]
    got = _empirical(model, prompt, params, n, RandomTreeProposer(6, seed=1), 2)
    for g, e in zip(got, exact):  # total-variation sampling noise for n=6000 over 12 tokens: about 0.02
        assert 0.5 * (g - e).abs().sum() < 0.04, (g, e)

    import mtpspec.decoding.loop as loop

    real = loop.verify_sampled_tree_row

    def biased(tokens, parents, p, g):  # after a miss at the root, half the time emit its first child
        path, emitted = real(tokens, parents, p, g)
        if not path and float(torch.rand((), generator=g)) < 0.5:
            emitted = [tokens[0]]
        return path, emitted

    monkeypatch.setattr(loop, "verify_sampled_tree_row", biased)
    broken = _empirical(model, prompt, params, n, RandomTreeProposer(6, seed=1), 2)
    assert 0.5 * (broken[0] - exact[0]).abs().sum() > 0.1


def test_verify_sampled_tree_row_walks_the_drawn_tokens():
    # root -> children 4 (node 1), 6 (node 2); node 1 -> child 8 (node 3)
    tokens, parents = [4, 6, 8], [0, 0, 1]
    p = torch.zeros(4, 10)
    p[0, 4] = 1.0  # the target surely draws 4 at the root: node 1 accepted
    p[1, 8] = 1.0  # then 8: node 3 accepted
    p[3, 2] = 1.0  # then 2: no child there, the bonus
    assert verify_sampled_tree_row(tokens, parents, p, None) == ([1, 3], [4, 8, 2])
    p[0] = 0.0
    p[0, 5] = 1.0  # 5 at the root: no child holds it
    assert verify_sampled_tree_row(tokens, parents, p, None) == ([], [5])
