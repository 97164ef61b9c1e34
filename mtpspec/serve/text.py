"""Text around the token-id scheduler: chat prompts from message lists. Stop strings and streamed
text come from `mtpspec.text` (shared with the Python API and the CLI)."""

from __future__ import annotations

from ..errors import InputError


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation with the tokenizer's chat template and the generation prompt."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer; use /v1/completions with token-id prompts")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("this model's tokenizer has no chat template; use /v1/completions")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # the template itself may reject a conversation (e.g. role order)
        raise InputError(f"the chat template rejected the messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
