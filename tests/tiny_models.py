"""Tiny random transformers models of each family, for equivalence and losslessness tests."""

from __future__ import annotations

import os

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 320


def tiny_hf_model(family: str, **overrides):
    """A tiny random transformers causal LM of `family` (eval mode, fp32)."""
    import transformers as tf

    torch.manual_seed({"llama": 0, "llama-untied": 1, "qwen2": 2, "gemma3": 3}[family])
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if family in ("llama", "llama-untied"):
        cfg = tf.LlamaConfig(num_hidden_layers=3, tie_word_embeddings=family == "llama",
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(num_hidden_layers=3, tie_word_embeddings=False, **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                               "sliding_attention"], final_logit_softcapping=30.0, **common)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = cls(cfg).eval()
    # transformers initialises norms to exactly 1 (or 0 for Gemma); randomise so they are tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


FAMILIES = ["llama", "llama-untied", "qwen2", "gemma3"]




CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def save_tiny_tokenizer(folder) -> None:
    """A byte-level BPE tokenizer with < VOCAB tokens (ids 0, 1, 2 = pad, bos, eos) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, stop here please", "a b c d e f g"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


CHAT_WORDS = "the quick brown fox jumps over the lazy dog hello world stop here please a b c d e f g".split()


def write_random_chats(path, n: int, seed: int = 0) -> None:
    """A .jsonl of n one-message chats of 3-7 random words (drafter-training test data)."""
    import json

    import torch

    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        k = int(torch.randint(3, 8, (1,), generator=g))
        msg = " ".join(CHAT_WORDS[int(j)] for j in torch.randint(len(CHAT_WORDS), (k,), generator=g))
        lines.append(json.dumps({"messages": [{"role": "user", "content": msg}]}))
    path.write_text("\n".join(lines) + "\n")


# Each supported family's chat template, in the form its real tokenizer ships it (self-instruct tests)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2 = SMOLLM2.replace("You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                        "You are a helpful assistant.")
GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA4 = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 = pad, bos, eos of the tiny configs
# family -> (special tokens in id order, bos, eos, chat template, the pre-query template as text)
CHAT_FAMILIES = {
    "llama": (CHATML, "<|im_start|>", "<|im_end|>", SMOLLM2,
              "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\n"),
    "qwen2": (CHATML, "<|im_start|>", "<|im_end|>", QWEN2,
              "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"),
    "gemma3": (["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", GEMMA3,
               "<bos><start_of_turn>user\n"),
    "gemma4": (["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>"], "<bos>", "<eos>", GEMMA4, "<bos><|turn>user\n"),
}
PLAIN = (["<pad>", "<s>", "</s>"], "<s>", "</s>", CHAT_TEMPLATE, "<s>user: ")  # the tests' minimal template
END_OF_TURN = {"llama": "<|im_end|>", "qwen2": "<|im_end|>", "gemma3": "<end_of_turn>", "gemma4": "<turn|>"}


def save_family_tokenizer(folder, family: str, template: bool = True):
    """A byte-level BPE tokenizer (< VOCAB tokens, ASCII only: random models write valid text) with
    the family's special tokens and a chat template of its form (or none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, chat, _ = PLAIN if family == "plain" else CHAT_FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? tell me a story",
            "you are a helpful assistant named smollm, trained by hugging face", "system user model"] * 20
    ascii_only = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]  # printable, space, newline (byte-level)
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=specials,
                                                      initial_alphabet=ascii_only))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=specials[0],
                                   extra_special_tokens=[s for s in specials if s not in (bos, eos, specials[0])])
    if template:
        fast.chat_template = chat
    fast.save_pretrained(folder)
    return fast
