"""The built-in benchmark prompts: short, varied user messages (rendered with the chat template).

Fixed so that runs on different days and machines are comparable. Batch size B uses the first B
prompts (cycled if B is larger than the list).
"""

from __future__ import annotations

CHAT_PROMPTS: tuple[str, ...] = (
    "Explain in simple terms why the sky is blue.",
    "Write a short poem about a lighthouse keeper who loves the winter.",
    "What are three practical tips for staying focused while working from home?",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Summarize the main causes of the French Revolution in a few sentences.",
    "I have eggs, spinach, cheese and bread. Suggest a quick breakfast recipe.",
    "What is the difference between a virus and a bacterium?",
    "Give me a friendly email reminding my team about Friday's project deadline.",
)


def token_id_prompts(vocab_size: int, n: int = len(CHAT_PROMPTS), *, seed: int = 1234) -> list[list[int]]:
    """Deterministic pseudo-random token-id prompts (8..40 tokens) for checkpoints without a tokenizer.

    Ids are drawn from [3, vocab_size) so the usual special ids 0..2 (unk/bos/eos) are avoided.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (n,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (k,), generator=g).tolist() for k in lengths]


def bench_prompts(engine, prompts=None, chat: bool = True) -> tuple[list[list[int]], str]:
    """Token ids of the prompts a benchmark runs, and what kind they are: the given ones (strings,
    token-id lists, or held-out benchmark prompts, rendered by `heldout.encode_prompt`), else the
    built-in chat prompts, else token-id prompts when the checkpoint has no tokenizer."""
    from .heldout import Prompt, encode_prompt

    if prompts and all(isinstance(p, Prompt) for p in prompts):
        return [encode_prompt(engine, p, chat=chat) for p in prompts], "heldout"
    if prompts is not None:
        return [engine.encode(p if isinstance(p, str) else list(p), chat=chat) for p in prompts], "given"
    tok = engine.tokenizer
    if tok is not None:
        kind = "chat" if chat and getattr(tok, "chat_template", None) else "text"
        return [engine.encode(p, chat=chat) for p in CHAT_PROMPTS], kind
    return token_id_prompts(engine.model.cfg.vocab_size), "token-ids (checkpoint has no tokenizer)"
