"""Our decoder against transformers 5.23 (the reference) on tiny random configs of each family."""

from __future__ import annotations

import pytest
import torch

from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.loop import Request, decode

from tiny_models import FAMILIES, VOCAB

TOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_prompt_forward_matches_reference(family, tiny_checkpoints):
    folder, hf = tiny_checkpoints[family]
    ours = load_decoder(folder)
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))  # > sliding window 8
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    out = ours(ids, ours.new_cache(2, 32))
    torch.testing.assert_close(out.logits, ref.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(out.hidden, ref.hidden_states[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_step_by_step_and_chunked_forward_match_reference(family, tiny_checkpoints):
    folder, hf = tiny_checkpoints[family]
    ours = load_decoder(folder)
    ids = torch.randint(3, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    # one token at a time
    cache = ours.new_cache(2, 32)
    steps = [ours(ids[:, t : t + 1], cache) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), ref.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat([s.hidden for s in steps], 1), ref.hidden_states[-1], atol=TOL, rtol=0)
    # a prefix, then chunks of 5 (the shape of a verify pass), crossing the sliding window
    cache = ours.new_cache(2, 32)
    chunks = [ours(ids[:, :3], cache)] + [ours(ids[:, t : t + 5], cache) for t in range(3, 23, 5)]
    torch.testing.assert_close(torch.cat([c.logits for c in chunks], 1), ref.logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_is_token_identical_to_transformers(family, tiny_checkpoints):
    folder, hf = tiny_checkpoints[family]
    ours = load_decoder(folder)
    prompt = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(2)).tolist()[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=64)[0, len(prompt):].tolist()
    seq = decode(ours, [Request(prompt, max_new_tokens=64)])[0]
    assert seq.new_ids == ref
    assert len(ref) == 64


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_ragged_batch_equals_each_prompt_alone(family, tiny_checkpoints):
    folder, _ = tiny_checkpoints[family]
    ours = load_decoder(folder)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 9, 1, 12)]
    alone = [decode(ours, [Request(p, max_new_tokens=20)])[0].new_ids for p in prompts]
    batch = [s.new_ids for s in decode(ours, [Request(p, max_new_tokens=20) for p in prompts])]
    assert batch == alone
