"""The public Python API: `mtpspec.load(...)` returns an `Engine` with `generate()` and `stream()`.

The engine owns the model and the tokenizer. It turns text into token ids (applying the chat
template unless asked not to), runs the decoding loop, and turns ids back into text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence as Seq

import torch

from .checkpoint import load_decoder
from .decoding.loop import Request, Sequence, StopCheck, generate as loop_generate, run
from .decoding.draft_length import AdaptiveDraftLength, DraftLengthPolicy
from .decoding.proposers import NgramProposer, Proposer
from .decoding.sampling import SamplingParams
from .errors import CheckpointError, InputError
from .models.decoder import Decoder
from .text import IncrementalText, cut_at_stop, make_stop_check, protected_chars, stop_strings

if TYPE_CHECKING:
    from .decoding.mtp import TreeShape

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


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer (with its chat template), or None if the folder has none."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


class Engine:
    """A loaded model (and optionally a proposer) ready to generate. Create it with `mtpspec.load(...)`.

    proposer: drafts tokens for speculative decoding (an MTP drafter or n-gram lookup), or None
        for plain decoding. draft_tokens: the default draft length K (None: adaptive, up to
        max_draft_tokens, chosen from measured acceptance and costs).
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer,
        path: Path,
        name: str,
        proposer: Proposer | None = None,
        draft_tokens: int | None = None,
        max_draft_tokens: int = 8,
        drafter_name: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.name = name
        self.proposer = proposer
        self.draft_tokens = draft_tokens
        self.max_draft_tokens = max_draft_tokens
        self.drafter_name = drafter_name
        # adaptive draft-length state, kept across calls (greedy and sampled accept differently)
        self._adaptive: dict[bool, AdaptiveDraftLength] = {}

    def draft_policy(self, draft_tokens: int | None, params: SamplingParams) -> DraftLengthPolicy | int:
        """The draft-length policy for one call: fixed K if given (or if a seeded sampling run must
        be reproducible: adaptive K depends on timings and so would change the random draws),
        else adaptive, with the acceptance and costs this engine measured in earlier calls (one
        state for greedy calls, one for sampled ones)."""
        k = self.draft_tokens if draft_tokens is None else draft_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise InputError(f"draft_tokens must be an integer >= 0 (0 = plain decoding), got {k!r}")
        if self.proposer is None:
            return 0
        if k is None and not params.greedy and params.seed is not None:
            k = self.max_draft_tokens // 2 or 1
        if k is not None:
            return k
        if params.greedy not in self._adaptive:
            self._adaptive[params.greedy] = AdaptiveDraftLength(self.max_draft_tokens)
        return self._adaptive[params.greedy]

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
        """Token ids for a prompt: token-id lists pass through; text gets the chat template if asked."""
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
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return tok.encode(prompt, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError(f"{self.path} has no tokenizer: pass prompts as lists of token ids")
        return self.tokenizer

    # ---- stop strings and output text (the API, the CLI and the server all use these) ----------
    def stop_check(self, stop: str | Seq[str] | None, min_tokens: int = 0) -> StopCheck | None:
        """The decoding loop's callback for stop strings (`Request.stop_check`), or None without
        any: given a sequence's new token ids, how many to keep once their text contains a stop
        string (the shortest prefix that does), else None. Raises InputError for invalid stop
        strings or a model without a tokenizer."""
        stop = stop_strings(stop)
        if stop:
            self._need_tokenizer()
        return make_stop_check(self.decode, stop, min_tokens)

    def final_text(self, ids: list[int], stop: str | Seq[str] | None = None, min_tokens: int = 0) -> str:
        """The text of generated token ids as results carry it: decoded, cut before the first stop
        string (with min_tokens: the first one ending after the text of the first min_tokens ids)."""
        stop = stop_strings(stop)
        text = self.decode(ids)
        return cut_at_stop(text, stop, protected_chars(self.decode, ids, min_tokens)) if stop else text

    def incremental_text(self, stop: str | Seq[str] | None = None, min_tokens: int = 0) -> IncrementalText:
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

    def _result(self, prompt: Prompt, seq: Sequence, stop) -> GenerationResult:
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
        `batch_size` at a time, a finished prompt's slot going to the next one (continuous batching). With a proposer loaded, decoding is speculative: draft_tokens fixes K
        (0 = plain decoding), None uses the engine's default (adaptive unless set at load).
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
        policy = self.draft_policy(draft_tokens, params)
        seqs = run(self.model, requests, self.proposer, policy, slots=size)
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
        return TextStream(self, prompt, requests, stop, self.draft_policy(draft_tokens, params))


class TextStream:
    """Iterator of text pieces for one prompt (see `Engine.stream`). The pieces concatenate to
    `.result.text`: a piece that could be the start of a stop string (or a partial character) is
    held back until later tokens settle it (`Engine.incremental_text`, as the server streams)."""

    def __init__(self, engine: Engine, prompt: Prompt, requests: list[Request], stop, policy) -> None:
        self._engine, self._prompt, self._stop = engine, prompt, stop
        self._events = loop_generate(engine.model, requests, engine.proposer, policy)
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


# package data (mtpspec/drafters/), so it ships in the wheel and is found wherever mtpspec is installed
SHIPPED_DRAFTER = Path(__file__).resolve().parent / "drafters" / "smollm2-135m-instruct"


def resolve_drafter(model: str | Path | None, drafter: str | Path | None) -> str | None:
    """A `--drafter` value for speculative decoding where one is wanted (server, spec bench):
    'none'/None -> None (plain); 'auto' -> the shipped MTP drafter of the default model
    (mtpspec/drafters/smollm2-135m-instruct) if it is there, else the n-gram proposer; anything else (a
    folder or 'ngram') as given."""
    if drafter in (None, "", "none"):
        return None
    if drafter == "auto":
        shipped = shipped_drafter() if model is None else None
        return str(shipped) if shipped is not None else "ngram"
    return str(drafter)


def shipped_drafter() -> Path | None:
    """The trained drafter for the default model that ships with the package (package data), if present."""
    return SHIPPED_DRAFTER if (SHIPPED_DRAFTER / "config.json").exists() else None


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
) -> Engine:
    """Load a model and, optionally, a drafter for speculative decoding.

    model: None = the default (SmolLM2-135M-Instruct), a checkpoint folder, or a .gguf file.
    drafter: "auto" (default) = the drafter shipped with mtpspec for the default model if there
        is one, else plain decoding; None = plain decoding; a drafter checkpoint folder
        (`gemma4_assistant` format); or "ngram" for model-free prompt-lookup drafting. draft_tokens: fixed draft length K
        (default: adaptive, up to the drafter's `num_assistant_tokens` x 2, or 8).
    draft_tree: with an MTP drafter, greedy generation drafts a tree of K levels instead of a chain
        of K tokens: "NODES:BEAM:BRANCH" (e.g. "5:1:2") or a `TreeShape` (decoding/mtp.py), at
        every batch size and for sampled rows too; "auto" (default) = `AUTO_TREE` ("6:1:3") when
        one sampled sequence is decoding, chains for greedy sequences and batches (what measured
        fastest on CPU, see its docstring); None or "none" = always chains.
    drafter_dtype: the MTP drafter's weights and activations. "auto" (default) = bfloat16 on CPU
        (drafting reads the drafter's weights from memory at every step, so half the bytes make it
        ~25% cheaper; acceptance is unchanged to within noise) and the target's dtype elsewhere;
        None = the target's dtype. Output tokens never depend on it (verification is the target's).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    folder = resolve_model_path(model, cache_dir)
    decoder = load_decoder(folder, device=dev, dtype=dt)
    tokenizer = load_tokenizer(folder)
    name = "SmolLM2-135M-Instruct" if model is None else Path(model).name
    proposer, max_k, drafter_name = None, 8, None
    if drafter == "auto":
        drafter = shipped_drafter() if model is None else None
    tree, tree_max_batch, tree_sampled, tree_greedy = None, None, True, True
    if draft_tree == "auto":
        from .decoding.mtp import AUTO_TREE

        tree, tree_max_batch, tree_sampled, tree_greedy = AUTO_TREE, 1, True, False
    elif draft_tree not in (None, "none"):
        from .decoding.mtp import TreeShape

        tree = TreeShape.parse(draft_tree)
        if drafter is None or drafter == "ngram":
            raise InputError("a draft tree needs an MTP drafter (plain decoding and n-gram drafting have none)")
    if drafter == "ngram":
        proposer, drafter_name = NgramProposer(), "ngram"
    elif drafter is not None:
        from .decoding.mtp import MtpProposer
        from .drafter_checkpoint import load_drafter

        if drafter_dtype == "auto":
            ddt = torch.bfloat16 if dev.type == "cpu" else dt
        else:
            ddt = dt if drafter_dtype is None else resolve_dtype(drafter_dtype)
        mtp = load_drafter(Path(drafter), decoder, device=dev, dtype=ddt)
        proposer, drafter_name = MtpProposer(mtp, tree, tree_max_batch, tree_sampled, tree_greedy), Path(drafter).name
        max_k = 2 * (getattr(mtp, "draft_tokens", None) or 4)
    return Engine(decoder, tokenizer, folder, name, proposer, draft_tokens, max_k, drafter_name)
