"""The real default model (SmolLM2-135M-Instruct): our engine against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM

    import mtpspec

    engine = mtpspec.load(quantize="none")  # dense fp32, as transformers builds it from the GGUF
    hf = AutoModelForCausalLM.from_pretrained(engine.path, dtype=torch.float32).eval()
    return engine, hf


def test_logits_and_hidden_states_match_transformers(pair):
    engine, hf = pair
    ids = torch.tensor([engine.encode("Explain what a KV cache is, in one paragraph.")])
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    out = engine.model(ids, engine.model.new_cache(1, ids.shape[1] + 8))
    # 2e-4 absolute, plus 1e-5 relative: our small-batch kernels and the decode attention
    # (kernels/attention.cpp, used for steps of <= 64 tokens like this prompt) sum in other orders
    # than MKL and SDPA, and over 30 layers that moves logits of magnitude ~35 by about 1e-4
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(out.hidden, ref.hidden_states[-1], atol=2e-4, rtol=1e-5)


def test_greedy_64_tokens_identical_to_transformers_generate(pair):
    engine, hf = pair
    for prompt in ["Write a limerick about a cat.", "What is 17 times 23?"]:
        ids = engine.encode(prompt)
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=64, do_sample=False, eos_token_id=None,
                          min_new_tokens=64, pad_token_id=2)[0, len(ids):].tolist()
        from mtpspec.decoding.loop import Request, decode

        ours = decode(engine.model, [Request(ids, max_new_tokens=64)])[0].new_ids
        assert ours == ref


def test_chat_answer_is_sensible(pair):
    engine, _ = pair
    r = engine.generate("What is the capital of France? Answer in one sentence.", max_new_tokens=30)
    assert "Paris" in r.text and r.finish_reason == "stop"


def test_shipped_drafter_acceptance_stays_in_its_band():
    """Acceptance regression for the shipped drafter: greedy K=4 chains, 64 tokens, the first four
    held-out chat and instruction prompts. Greedy decoding is deterministic, so this moves only
    when the drafter, its inputs or the target's numerics change; a drafter conditioned on the
    target's hidden state one position off fell from ~2.2 to ~1.6 here. Retraining the drafter
    means re-measuring the band."""
    import json
    from pathlib import Path

    import mtpspec

    engine = mtpspec.load(draft_tree=None, prompt_lookup=False)  # the drafter alone
    assert engine.drafter_name == "smollm2-135m-instruct"
    root = Path(__file__).resolve().parent.parent / "drafters"
    prompts = [json.loads(line)["prompt"] for name in ("chat", "instructions")
               for line in (root / f"heldout-{name}.jsonl").read_text().splitlines()[:4]]
    results = engine.generate(prompts, max_new_tokens=64, draft_tokens=4, batch_size=1)
    tau = sum(r.stats["mean_accepted_length"] for r in results) / len(results)
    # Rounding changes that keep the target exact to ~1e-6 still change some greedy continuations
    # of these 8 prompts, and tau with them: per-op blocks 2.056, fused blocks 2.377, fused with
    # fp32 attention exponentials 2.064 (stage-5 drafter); the stage-6 drafter 2.074. The band spans
    # that spread; the bugs it is for fall to ~1.6.
    assert 1.95 <= tau <= 2.6, f"mean accepted length {tau:.3f}, measured 2.074 with the stage-6 drafter"


def test_prompt_lookup_raises_acceptance_where_answers_copy_from_the_prompt():
    """The default engine (prompt lookup in front of the shipped drafter) against the drafter
    alone, greedy K=4 chains, on the first 3 extraction and summarization prompts of the broad
    benchmark: identical tokens, and more tokens per target forward (measured: drafter alone
    1.698, with lookup 2.688)."""
    import mtpspec
    from mtpspec.bench.heldout import encode_prompt, load_heldout

    with_lookup = mtpspec.load(draft_tree=None)
    alone = with_lookup.with_proposer(with_lookup.proposer.inner, draft_tokens=4, draft_tree=None)
    prompts = [p for ps in load_heldout("extraction,summarization", per_category=3).values() for p in ps]
    ids = [encode_prompt(with_lookup, p) for p in prompts]
    a = with_lookup.generate(ids, max_new_tokens=64, draft_tokens=4, chat=False)
    b = alone.generate(ids, max_new_tokens=64, chat=False)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    tau = lambda rs: sum(r.stats["mean_accepted_length"] for r in rs) / len(rs)  # noqa: E731
    assert tau(a) > tau(b) + 0.4, f"with lookup {tau(a):.3f}, drafter alone {tau(b):.3f}"
