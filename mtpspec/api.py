"""The public Python API: `mtpspec.load(...)` returns an `Engine` with `generate()` and `stream()`.

The engine owns the model, the tokenizer and the drafting plan (decoding/plan.py). It turns text
into token ids (applying the chat template unless asked not to: the one implementation of it,
which the server uses too), runs the decoding loop, and turns ids back into text. Engines that
share the model with another plan come from `Engine.plain()` and `Engine.with_proposer(...)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .checkpoint import load_decoder
from .decoding.loop import Request, SequenceState, StopCheck, decode, decode_events
from .decoding.plan import DraftPlan, resolve_drafter
from .decoding.proposers import NgramProposer, Proposer
from .decoding.sampling import SamplingParams
from .errors import CheckpointError, InputError
from .models.decoder import Decoder
from .text import IncrementalText, cut_at_stop, make_stop_check, protected_chars, stop_strings

if TYPE_CHECKING:
    from .decoding.draft_length import DraftLengthPolicy
    from .decoding.tree import TreeShape

log = logging.getLogger("mtpspec")

Prompt = str | list[int]


@dataclass
class GenerationResult:
    """One prompt's output: the new token ids, their text, why generation ended, and statistics."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: dict

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "stats": self.stats}


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device {device!r} is not a valid torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def resolve_model_path(model: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """A checkpoint folder for `model`: None = the default model, a .gguf file = its cached conversion."""
    if model is None:
        from .default_model import default_model_dir

        return default_model_dir(cache_dir)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        from .gguf_convert import cached_gguf_checkpoint

        return cached_gguf_checkpoint(path, cache_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: model folder does not exist")
    return path


def resolve_quantize(model: str | Path | None, quantize: str) -> tuple[str, Path | None]:
    """(load_decoder's quantize mode, the GGUF file it reads) for `load(model, quantize=...)`."""
    from .models.quantize import QUANTIZE_CHOICES

    if quantize not in QUANTIZE_CHOICES:
        raise InputError(f"unknown quantization {quantize!r}; valid: {', '.join(QUANTIZE_CHOICES)}")
    gguf_file = None
    if model is None:
        from .default_model import find_default_gguf

        gguf_file = find_default_gguf()
    elif Path(model).suffix == ".gguf":
        gguf_file = Path(model).expanduser()
    if quantize == "gguf" and gguf_file is None:
        raise InputError(f"quantize='gguf' keeps a GGUF file's quantization, but {model} is not a .gguf file "
                         "(use 'int8' or 'int4' to quantize it at load time)")
    if quantize == "auto":
        quantize = "gguf" if gguf_file is not None else "none"
    return quantize, gguf_file


DRAFTER_QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")


def resolve_drafter_quantize(drafter_quantize: str, device: torch.device) -> str:
    """"none", "int8" or "int4" for `load(..., drafter_quantize=...)` on `device`."""
    from . import kernels

    if drafter_quantize not in DRAFTER_QUANTIZE_CHOICES:
        raise InputError(f"unknown drafter quantization {drafter_quantize!r}; valid: {', '.join(DRAFTER_QUANTIZE_CHOICES)}")
    if drafter_quantize == "auto":
        return "int8" if device.type == "cpu" and kernels.kernel_info()["path"] == "cpp" else "none"
    return drafter_quantize


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer (with its chat template), or None if the folder has none."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation with the tokenizer's chat template and the generation prompt
    (the one implementation: `Engine.encode_chat`, `Engine.encode` and the server use it)."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer: pass prompts as lists of token ids")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("this model's tokenizer has no chat template: pass raw prompts")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # the template itself may reject a conversation (e.g. role order)
        raise InputError(f"the chat template rejected the messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


class Engine:
    """A loaded model, its tokenizer and a drafting plan, ready to generate. Create it with
    `mtpspec.load(...)`; `plain()` and `with_proposer(...)` give engines on the same model (the
    weights are shared) with another plan.

    plan: how to draft (`DraftPlan`: proposer, draft length, draft trees); None = plain decoding.
    drafter_name: what to call the drafter in reports (`mtpspec serve`, `/v1/models`).
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer,
        path: Path,
        name: str,
        plan: DraftPlan | None = None,
        *,
        drafter_name: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.name = name
        self.plan = plan if plan is not None else DraftPlan()
        self.drafter_name = drafter_name

    def plain(self) -> "Engine":
        """This model and tokenizer without a drafter (plain decoding)."""
        return Engine(self.model, self.tokenizer, self.path, self.name)

    def with_proposer(
        self,
        proposer: Proposer | None,
        *,
        draft_tokens: "int | DraftLengthPolicy | None" = None,
        draft_tree: "str | TreeShape | None" = "auto",
        max_draft_tokens: int | None = None,
        drafter_name: str | None = None,
    ) -> "Engine":
        """This model and tokenizer drafting with `proposer` (None: plain decoding), with a new
        `DraftPlan(proposer, draft_tokens, draft_tree=..., max_draft_tokens=...)` (fresh adaptive
        state; see `DraftPlan` for the options, `load` for their defaults)."""
        plan = DraftPlan(proposer, draft_tokens, draft_tree=draft_tree, max_draft_tokens=max_draft_tokens)
        if drafter_name is None and isinstance(proposer, NgramProposer):
            drafter_name = "ngram"
        return Engine(self.model, self.tokenizer, self.path, self.name, plan, drafter_name=drafter_name)

    # the plan's settings, read through the engine
    @property
    def proposer(self) -> Proposer | None:
        return self.plan.proposer

    @property
    def draft_tokens(self) -> int | None:
        """The fixed draft length K of this engine's plan, or None (adaptive)."""
        d = self.plan.draft_tokens
        return d if isinstance(d, int) else None

    @property
    def max_draft_tokens(self) -> int:
        return self.plan.max_draft_tokens

    @property
    def eos_ids(self) -> frozenset[int]:
        ids = set(self.model.cfg.eos_token_ids)
        gen = self.path / "generation_config.json"
        if gen.exists():
            import json

            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # ---- text <-> ids ------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = True) -> list[int]:
        """Token ids for a prompt: token-id lists pass through; text gets the chat template if asked
        (and the tokenizer has one)."""
        if isinstance(prompt, list):
            if not prompt:
                raise InputError("prompt is empty (no token ids)")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise InputError("a token-id prompt must be a list of integers")
            return prompt
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InputError("prompt is empty")
        tok = self._need_tokenizer()
        if chat and getattr(tok, "chat_template", None):
            return encode_chat(tok, [{"role": "user", "content": prompt}])
        return tok.encode(prompt, add_special_tokens=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation (a list of {"role", "content"} messages) with the chat
        template and the generation prompt. InputError without a tokenizer or chat template, or if
        the template rejects the messages."""
        return encode_chat(self._need_tokenizer(), messages)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError(f"{self.path} has no tokenizer: pass prompts as lists of token ids")
        return self.tokenizer

    # ---- stop strings and output text (the API, the CLI and the server all use these) ----------
    def stop_check(self, stop: str | Sequence[str] | None, min_tokens: int = 0) -> StopCheck | None:
        """The decoding loop's callback for stop strings (`Request.stop_check`), or None without
        any: given a sequence's new token ids, how many to keep once their text contains a stop
        string (the shortest prefix that does), else None. Raises InputError for invalid stop
        strings or a model without a tokenizer."""
        stop = stop_strings(stop)
        if stop:
            self._need_tokenizer()
        return make_stop_check(self.decode, stop, min_tokens)

    def final_text(self, ids: list[int], stop: str | Sequence[str] | None = None, min_tokens: int = 0) -> str:
        """The text of generated token ids as results carry it: decoded, cut before the first stop
        string (with min_tokens: the first one ending after the text of the first min_tokens ids)."""
        stop = stop_strings(stop)
        text = self.decode(ids)
        return cut_at_stop(text, stop, protected_chars(self.decode, ids, min_tokens)) if stop else text

    def incremental_text(self, stop: str | Sequence[str] | None = None, min_tokens: int = 0) -> IncrementalText:
        """Streamed text of one sequence: `.delta(new_ids, finished)` gives the text new since
        the last call, holding back a partial character or a possible start of a stop string,
        so the pieces always concatenate to `final_text(new_ids, stop, min_tokens)`."""
        stop = stop_strings(stop)
        return IncrementalText(lambda ids: self.final_text(ids, stop, min_tokens), stop)

    # ---- generation --------------------------------------------------------------------------
    def _requests(self, prompts: list[Prompt], max_new_tokens: int, params: SamplingParams, stop, chat: bool,
                  ignore_eos: bool = False, min_tokens: int = 0):
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
            raise InputError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
        if min_tokens > max_new_tokens:
            raise InputError(f"min_tokens ({min_tokens}) must be <= max_new_tokens ({max_new_tokens})")
        if not isinstance(ignore_eos, bool):
            raise InputError(f"ignore_eos must be a boolean, got {ignore_eos!r}")
        check = self.stop_check(stop, min_tokens)
        ids = [self.encode(p, chat) for p in prompts]
        return [Request(i, max_new_tokens, params, self.eos_ids, check, min_tokens, ignore_eos) for i in ids]

    def _result(self, prompt: Prompt, seq: SequenceState, stop) -> GenerationResult:
        return GenerationResult(
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=seq.request.prompt_ids,
            token_ids=list(seq.new_ids),
            text=self.final_text(seq.new_ids, stop, seq.request.min_tokens),
            finish_reason=seq.finish_reason or "length",
            stats=seq.stats.as_dict(),
        )

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        chat: bool = True,
        batch_size: int | None = None,
        draft_tokens: int | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns one result) or a list of prompts (returns a list).

        A prompt is a string (the chat template is applied unless chat=False) or a list of token
        ids (used as is). temperature=0 is greedy. Prompts run as one batch, or at most
        `batch_size` at a time, a finished prompt's slot going to the next one (continuous
        batching). With a drafter loaded, decoding is speculative, as the engine's plan says
        (`DraftPlan.decide`): draft_tokens fixes K for this call (0 = plain decoding), None uses
        the engine's default (adaptive, learning across calls, unless fixed at load).
        ignore_eos: EOS is an ordinary token (kept in token_ids); decoding runs to max_new_tokens
        or a stop string. min_tokens: no EOS and no stop string within the first min_tokens new
        tokens (EOS masked in the target's distribution there; see `Request`).
        """
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        plist: list[Prompt] = [prompts] if single else list(prompts)
        if not plist:
            raise InputError("no prompts given")
        params = SamplingParams(temperature, top_k, top_p, seed)
        requests = self._requests(plist, max_new_tokens, params, stop, chat, ignore_eos, min_tokens)
        size = batch_size or len(requests)
        if size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        seqs = decode(self.model, requests, self.plan.with_draft_tokens(draft_tokens), slots=size)
        results = [self._result(p, s, stop) for p, s in zip(plist, seqs)]
        return results[0] if single else results

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        chat: bool = True,
        draft_tokens: int | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
    ) -> "TextStream":
        """Generate for one prompt, yielding text pieces as they come; `.result` holds the final
        `GenerationResult` once the stream is exhausted. Parameters as `generate`."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        requests = self._requests([prompt], max_new_tokens, params, stop, chat, ignore_eos, min_tokens)
        return TextStream(self, prompt, requests, stop, self.plan.with_draft_tokens(draft_tokens))


class TextStream:
    """Iterator of text pieces for one prompt (see `Engine.stream`). The pieces concatenate to
    `.result.text`: a piece that could be the start of a stop string (or a partial character) is
    held back until later tokens settle it (`Engine.incremental_text`, as the server streams)."""

    def __init__(self, engine: Engine, prompt: Prompt, requests: list[Request], stop, plan: DraftPlan) -> None:
        self._engine, self._prompt, self._stop = engine, prompt, stop
        self._events = decode_events(engine.model, requests, plan)
        self._text = engine.incremental_text(stop, requests[0].min_tokens)
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                ev = next(self._events)
            except StopIteration as done:
                seq = done.value[0]
                break
            piece = self._text.delta(ev.new_ids, ev.finished)
            if piece:
                yield piece
        self.result = self._engine._result(self._prompt, seq, self._stop)
        piece = self._text.delta(seq.new_ids, True)  # empty unless the last event was not final
        if piece:
            yield piece


def load(
    model: str | Path | None = None,
    *,
    drafter: str | Path | None = "auto",
    draft_tokens: int | None = None,
    draft_tree: "str | TreeShape | None" = "auto",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    drafter_dtype: str | torch.dtype | None = "auto",
    cache_dir: str | Path | None = None,
    quantize: str = "auto",
    prompt_lookup: bool = True,
    drafter_quantize: str = "auto",
) -> Engine:
    """Load a model and, optionally, a drafter for speculative decoding.

    model: None = the default (SmolLM2-135M-Instruct), a checkpoint folder, or a .gguf file.
    drafter: "auto" (default) = the drafter shipped with mtpspec for this model if there is one
        (for the default model), else plain decoding (`resolve_drafter`); None or "none" = plain
        decoding; a drafter checkpoint folder (`gemma4_assistant` format); or "ngram" for
        model-free prompt-lookup drafting.
    draft_tokens: fixed draft length K (default: adaptive, up to the drafter's
        `num_assistant_tokens` x 2, or 8).
    draft_tree: with an MTP drafter, draft a tree of K levels instead of a chain of K tokens:
        "NODES:BEAM:BRANCH" (e.g. "5:1:2") or a `TreeShape`, at every round; "auto" (default) =
        `AUTO_TREE` ("6:1:3") while one sampled sequence decodes, chains for greedy sequences and
        batches; None or "none" = always chains (decoding/plan.py decides each round).
    drafter_dtype: the MTP drafter's weights and activations. "auto" (default) = bfloat16 on CPU
        (drafting reads the drafter's weights from memory at every step, so half the bytes make it
        cheaper; acceptance is unchanged to within noise) and the target's dtype elsewhere;
        None = the target's dtype. Output tokens never depend on it (verification is the target's).
    quantize: how the target's weight matrices are held. "auto" (default) = as in the file for a
        GGUF (the default model's Q4_1 stays 4-bit), dense otherwise; "gguf" = the GGUF's own
        quantized matrices; "int8" / "int4" = quantized at load time (any checkpoint); "none" =
        dense in `dtype` (a GGUF is dequantized). Quantized layers use int8 activations
        (kernels/quant.py); norms, attention and the KV cache stay in `dtype`.
    drafter_quantize: the MTP drafter's projections (pre/post projection, its layers' q, o and
        MLP). "auto" (default) = "int8" on CPU with the compiled kernels (a drafting step reads
        every weight: int8 makes drafting the default drafter 5-15% cheaper, same acceptance),
        else "none"; "int8" / "int4" (round-to-nearest per block of 32, as `quantize`); "none" =
        dense in `drafter_dtype`. The LM head and norms stay in `drafter_dtype`.
    prompt_lookup: with an MTP drafter, rows whose last 2+ tokens occurred earlier in their
        prompt or output draft the tokens that followed there instead of the drafter's
        (`decoding.lookup.PromptLookupProposer`; free, and accepted far more often on text that
        copies from its context). False = the MTP drafter alone.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    mode, gguf_file = resolve_quantize(model, quantize)
    drafter_mode = resolve_drafter_quantize(drafter_quantize, dev)
    folder = resolve_model_path(model, cache_dir)
    if draft_tree not in (None, "none", "auto"):
        from .decoding.tree import TreeShape

        TreeShape.parse(draft_tree)  # a malformed shape fails before any weights load
    decoder = load_decoder(folder, device=dev, dtype=dt, quantize=mode, gguf=gguf_file)
    name = "SmolLM2-135M-Instruct" if model is None else Path(model).name
    engine = Engine(decoder, load_tokenizer(folder), folder, name)
    chosen = resolve_drafter(model, drafter)
    if chosen is None:
        return engine.with_proposer(None, draft_tokens=draft_tokens, draft_tree=draft_tree)
    if chosen == "ngram":
        return engine.with_proposer(NgramProposer(), draft_tokens=draft_tokens, draft_tree=draft_tree)
    if drafter_dtype == "auto":
        ddt = torch.bfloat16 if dev.type == "cpu" else dt
    else:
        ddt = dt if drafter_dtype is None else resolve_dtype(drafter_dtype)
    from .decoding.mtp import MtpProposer
    from .drafter_checkpoint import load_drafter

    mtp = load_drafter(Path(chosen), decoder, device=dev, dtype=ddt)
    if drafter_mode != "none":
        mtp.quantize(drafter_mode)
    proposer = MtpProposer(mtp)
    if prompt_lookup:
        from .decoding.lookup import PromptLookupProposer

        proposer = PromptLookupProposer(proposer)
    return engine.with_proposer(proposer, draft_tokens=draft_tokens, draft_tree=draft_tree,
                                drafter_name=Path(chosen).name + ("+lookup" if prompt_lookup else ""))
