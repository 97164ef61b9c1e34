"""Self-distillation through an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, or
`mtpspec serve`): the answers to the data's prompts come from the server, many requests at a
time; the target's activations are still harvested locally from its own weights over prompt +
answer (harvest.py), so the teacher stays exact whatever the server's numerics.

Requests: POST <url>/v1/completions with the prompt as token ids (rendered locally with the
target's chat template, so the server's template plays no part), greedy (temperature 0) unless
sampling settings are given, `return_token_ids` asked for. The answer's token ids are read from the
choice's `token_ids` (mtpspec serve; vLLM with `return_token_ids`) or `tokens`; a server that
returns only text has it re-tokenized with the target's tokenizer, which must give the text back.

Checks: the server is reached first through /v1/models (with --distill-model, the name must be
listed there); the first answers must use the target's vocabulary: every id inside it, and, where
the server returns ids and text, the ids decoded with the target's tokenizer give the server's text
(another model's vocabulary does not). HTTP 408/429/5xx, timeouts and dropped connections are
retried with exponential backoff; other HTTP errors, and the retries running out, stop the run
with a message naming the server and the problem.

Resume: every answer is appended to <work_dir>/distill/answers*.jsonl (one file per rank) as it
arrives, keyed by a hash of the prompt's token ids, max_tokens and the sampling settings; a
restarted run (any world size) asks only for the answers it does not have. A run that fails or is
killed keeps every answer it received.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError, MtpspecError

CHECK_FIRST = 8  # answers whose vocabulary is checked (ids decoded vs the server's text)
API_KEY_ENV = "MTPSPEC_DISTILL_API_KEY"  # sent as "Authorization: Bearer ..." when set


@dataclass(frozen=True)
class Sampling:
    """How the server samples answers: temperature 0 = greedy (the default); top_k 0 = off. A
    sampled request carries a seed derived from `seed` and the prompt, so a server that honours
    seeds gives the same answers again."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def settings(self) -> dict:
        if self.greedy:
            return {"temperature": 0.0}
        return {"temperature": float(self.temperature), "top_p": float(self.top_p), "top_k": int(self.top_k),
                "seed": int(self.seed)}


def answer_key(prompt: list[int], max_tokens: int, sampling: Sampling) -> str:
    """The cache key of one request: a hash of the prompt's token ids, max_tokens and the sampling
    settings."""
    blob = json.dumps({"prompt": list(prompt), "max_tokens": int(max_tokens), **sampling.settings()},
                      separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class AnswerCache:
    """The answers received so far: every answers*.jsonl in `folder` is read (all ranks' files);
    this process appends to its own file, one flushed line per answer. A line cut short by a kill
    is skipped."""

    def __init__(self, folder: Path, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / ("answers.jsonl" if rank == 0 else f"answers.rank{rank}.jsonl")
        self.answers: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._fh = None
        self._closed = False
        for f in sorted(self.folder.glob("answers*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.answers[rec["key"]] = [int(t) for t in rec["ids"]]
                except (ValueError, KeyError, TypeError):
                    continue  # a partial last line (killed while writing)

    def __contains__(self, key: str) -> bool:
        return key in self.answers

    def __getitem__(self, key: str) -> list[int]:
        return self.answers[key]

    def __len__(self) -> int:
        return len(self.answers)

    def put(self, key: str, ids: list[int], **info) -> None:
        line = json.dumps({"key": key, "ids": list(ids), **info}, separators=(",", ":")) + "\n"
        with self._lock:
            if self._closed:  # an answer arriving after an interrupt: asked for again next time
                return
            if self._fh is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                ends_cut = (self.path.is_file() and self.path.stat().st_size
                            and not self.path.read_bytes().endswith(b"\n"))
                self._fh = open(self.path, "a", encoding="utf-8")
                if ends_cut:
                    self._fh.write("\n")
            self._fh.write(line)
            self._fh.flush()
            self.answers[key] = list(ids)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class _Retry(Exception):
    """A failure worth retrying (timeout, dropped connection, HTTP 408/429/5xx)."""


class RetriesExhausted(MtpspecError):
    """A request kept failing; `last` says how."""

    def __init__(self, message: str, last: str) -> None:
        super().__init__(message)
        self.last = last


def _error_text(r) -> str:
    """The message of an error response: OpenAI's {"error": {"message"}}, else the body's start."""
    try:
        body = r.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(body, dict) and body.get("detail"):
            return str(body["detail"])
    except ValueError:
        pass
    return (r.text or r.reason_phrase or "").strip()[:300]


def _visible(text: str) -> str:
    """Text as compared between the server and the target's tokenizer: without replacement
    characters (a cut multi-byte character) and whitespace (detokenizers differ in the spaces
    around punctuation and at the start)."""
    return "".join(text.replace("\ufffd", "").split())


class RemoteTeacher:
    """Answers to prompts (token ids) from an OpenAI-compatible server, cached in `cache`.

    tokenizer: the target's (decodes ids to check the vocabulary, re-tokenizes text-only
    answers); vocab_size: the target's. `log(msg)`: progress and warnings (None: quiet).
    backoff: seconds before the first retry, doubled at each (capped at a minute)."""

    def __init__(self, url: str, tokenizer, vocab_size: int, cache: AnswerCache, *, model: str | None = None,
                 concurrency: int = 8, sampling: Sampling = Sampling(), timeout: float = 600.0, retries: int = 5,
                 backoff: float = 1.0, log: Callable[[str], None] | None = None) -> None:
        try:
            import httpx
        except ImportError:  # pragma: no cover - a dependency of mtpspec
            raise MtpspecError("--distill-url needs the httpx package: pip install httpx") from None
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--distill-url {url!r}: expected an http:// or https:// address, e.g. "
                             f"http://127.0.0.1:8000")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.tokenizer, self.vocab_size, self.cache = tokenizer, vocab_size, cache
        self.model, self.concurrency, self.sampling = model, max(1, concurrency), sampling
        self.timeout, self.retries, self.backoff, self.log = timeout, retries, backoff, log
        headers = {"Authorization": f"Bearer {os.environ[API_KEY_ENV]}"} if os.environ.get(API_KEY_ENV) else {}
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=self.concurrency,
                                                        max_keepalive_connections=self.concurrency))
        self._connected = False
        self._checked = 0  # answers whose vocabulary was checked
        self._check_lock = threading.Lock()
        self._count_gap = [0, 0]  # text-only answers: (tokens the server counted, tokens re-tokenized)
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self.requests = 0  # requests sent by this process (retries included)

    # ---- the public part ---------------------------------------------------------------------
    def answers(self, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        """The answer (generated token ids, EOS excluded) to each prompt: from the cache, else from
        the server (concurrently; each stored as it arrives)."""
        keys = [answer_key(p, n, self.sampling) for p, n in zip(prompts, max_tokens)]
        todo: dict[str, tuple[list[int], int]] = {}
        for k, p, n in zip(keys, prompts, max_tokens):
            if k not in self.cache:
                todo.setdefault(k, (p, n))
        if todo:
            self._stop.clear()
            self._connect()
            items = list(todo.items())
            if self._checked == 0:  # one request first: a wrong server fails once, not `concurrency` times
                self._fetch(*items[0])
                items = items[1:]
            self._fetch_all(items)
        return [self.cache[k] for k in keys]

    def close(self) -> None:
        self._client.close()
        self.cache.close()

    # ---- HTTP --------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def _with_retries(self, what: str, send):
        """send() -> response, retried with backoff on _Retry; a final failure raises MtpspecError."""
        last = ""
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise _Stopped()
            try:
                return send()
            except _Retry as e:
                last = str(e)
            if attempt < self.retries:
                delay = min(60.0, self.backoff * 2 ** attempt)
                self._say(f"distill: {what}: {last}; retrying in {delay:g}s ({attempt + 1}/{self.retries})")
                if self._stop.wait(delay):
                    raise _Stopped()
        stored = f"; the {len(self.cache)} answers received so far are kept in {self.cache.folder}" if self.cache else ""
        raise RetriesExhausted(f"distillation server {self.url}: {what} failed: {last} (after {self.retries} "
                               f"retries, --distill-retries){stored}; rerun with --resume to continue", last)

    def _send(self, method: str, path: str, **kw):
        httpx = self._httpx
        try:
            self.requests += 1
            r = self._client.request(method, self.url + path, **kw)
        except httpx.TimeoutException:
            raise _Retry(f"no answer within {self.timeout:g}s (--distill-timeout)") from None
        except httpx.TransportError as e:
            raise _Retry(f"connection failed ({type(e).__name__}: {e})") from None
        if r.status_code in (408, 429) or r.status_code >= 500:
            raise _Retry(f"HTTP {r.status_code}: {_error_text(r)}")
        return r

    def _connect(self) -> None:
        """Reach the server through /v1/models; check or choose the model name."""
        if self._connected:
            return
        try:
            r = self._with_retries("GET /v1/models", lambda: self._send("GET", "/v1/models"))
        except RetriesExhausted as e:
            raise InputError(f"cannot reach the distillation server {self.url} (--distill-url): {e.last} (after "
                             f"{self.retries} retries, --distill-retries)") from None
        names = None
        if r.status_code == 200:
            try:
                names = [m["id"] for m in r.json()["data"]]
            except (ValueError, KeyError, TypeError):
                names = None
        elif r.status_code in (401, 403):
            raise InputError(f"distillation server {self.url}: GET /v1/models was refused (HTTP {r.status_code}: "
                             f"{_error_text(r)}); set {API_KEY_ENV} to its API key")
        if self.model is not None:
            if names is not None and self.model not in names:
                raise InputError(f"distillation server {self.url} serves {', '.join(map(repr, names)) or 'no model'}, "
                                 f"not {self.model!r} (--distill-model)")
            if names is None:
                self._say(f"distill: {self.url} lists no models (GET /v1/models: HTTP {r.status_code}); "
                          f"cannot check --distill-model {self.model!r}")
        elif names is not None and len(names) > 1:
            raise InputError(f"distillation server {self.url} serves several models ({', '.join(names)}): "
                             f"choose one with --distill-model")
        elif names:
            self.model = names[0]
        self._connected = True
        self._say(f"distill: answers from {self.url}" + (f" (model {self.model})" if self.model else "") +
                  (" greedy" if self.sampling.greedy else f" sampled {self.sampling.settings()}"))

    def _body(self, key: str, prompt: list[int], max_tokens: int) -> dict:
        body = {"prompt": list(prompt), "max_tokens": int(max_tokens), "stream": False, "n": 1,
                "return_token_ids": True}
        if self.model:
            body["model"] = self.model
        s = self.sampling
        if s.greedy:
            body["temperature"] = 0.0
        else:
            body.update(temperature=float(s.temperature), top_p=float(s.top_p), seed=int(key[:8], 16) % (2 ** 31))
            if s.top_k:
                body["top_k"] = int(s.top_k)
        return body

    def _fetch(self, key: str, job: tuple[list[int], int]) -> None:
        prompt, max_tokens = job
        body = self._body(key, prompt, max_tokens)
        r = self._with_retries("POST /v1/completions", lambda: self._send("POST", "/v1/completions", json=body))
        if r.status_code != 200:
            msg = _error_text(r)
            hint = ""
            if r.status_code == 404 and "model" in msg.lower():
                hint = " (choose the served model with --distill-model)"
            elif r.status_code == 404:
                hint = " (the server needs the /v1/completions endpoint: prompts are sent as token ids)"
            elif r.status_code in (401, 403):
                hint = f" (set {API_KEY_ENV} to the server's API key)"
            elif r.status_code in (400, 422) and "prompt" in msg.lower():
                hint = " (prompts are sent as token ids: the server must accept them at /v1/completions)"
            raise InputError(f"distillation server {self.url}: POST /v1/completions answered HTTP {r.status_code}: "
                             f"{msg}{hint}")
        ids, info = self._answer_ids(r, prompt)
        self.cache.put(key, ids, **info)

    def _fetch_all(self, items: list[tuple[str, tuple[list[int], int]]]) -> None:
        """The requests `concurrency` at a time; the first failure stops the others (answers
        already received are stored) and is raised."""
        if not items:
            return
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="distill")
        try:
            futures = [pool.submit(self._fetch, k, job) for k, job in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                e = f.exception() if f.done() and not f.cancelled() else None
                if e is not None and not isinstance(e, _Stopped):
                    raise e
        except Exception:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)  # the requests in flight finish: their answers are kept
            raise
        except BaseException:  # Ctrl-C: leave now
            self._stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    # ---- answers and their vocabulary --------------------------------------------------------
    def _answer_ids(self, r, prompt: list[int]) -> tuple[list[int], dict]:
        try:
            data = r.json()
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise InputError(f"distillation server {self.url}: POST /v1/completions did not return an OpenAI "
                             f"completion (expected 'choices'): {r.text[:200]!r}") from None
        text = choice.get("text")
        ids = choice.get("token_ids")
        if ids is None and isinstance(choice.get("tokens"), list) and all(isinstance(t, int) for t in choice["tokens"]):
            ids = choice["tokens"]
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        n_prompt = usage.get("prompt_tokens")
        if isinstance(n_prompt, int) and n_prompt != len(prompt) and "prompt" not in self._warned:
            self._warned.add("prompt")
            self._say(f"distill: warning: the server counted {n_prompt} prompt tokens for a prompt of {len(prompt)} "
                      f"token ids (does it add tokens, e.g. a BOS?)")
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InputError(f"distillation server {self.url}: the answer's token_ids are not a list of integers")
            self._check_ids(ids, text)
            return list(ids), {"finish_reason": choice.get("finish_reason")}
        if not isinstance(text, str):
            raise InputError(f"distillation server {self.url}: the completion has neither 'token_ids' nor 'text'")
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        back = self.tokenizer.decode(ids, skip_special_tokens=False)
        if back != text:
            raise InputError(f"distillation server {self.url}: the answer text does not round-trip through the "
                             f"target's tokenizer ({text[:60]!r} -> {back[:60]!r}): the server serves a model with "
                             f"another vocabulary")
        self._check_ids(ids, None)
        n_done = usage.get("completion_tokens")
        if isinstance(n_done, int) and self._checked <= CHECK_FIRST:
            self._count_gap[0] += n_done
            self._count_gap[1] += len(ids)
            a, b = self._count_gap
            if self._checked == CHECK_FIRST and abs(a - b) > 0.25 * max(a, b) and "count" not in self._warned:
                self._warned.add("count")
                self._say(f"distill: warning: the server counted {a} answer tokens in its first answers, the target's "
                          f"tokenizer finds {b} in their text: is it serving a model with another vocabulary?")
        return ids, {"finish_reason": choice.get("finish_reason"), "from_text": True}

    def _check_ids(self, ids: list[int], text: str | None) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"distillation server {self.url}: answer token id {bad[0]} is outside the target's "
                             f"vocabulary ({self.vocab_size} tokens): the server serves another model")
        with self._check_lock:
            if self._checked >= CHECK_FIRST:
                return
            self._checked += 1
        if text is not None and self.tokenizer is not None:
            mine = self.tokenizer.decode(ids, skip_special_tokens=True)
            if _visible(mine) != _visible(text):
                raise InputError(f"distillation server {self.url}: vocabulary mismatch: the answer's token ids "
                                 f"decode to {mine[:60]!r} with the target's tokenizer, the server wrote "
                                 f"{text[:60]!r}: the server serves a model with another vocabulary")


class _Stopped(Exception):
    """A request abandoned because another one failed."""


def stderr_log(prefix: str = "") -> Callable[[str], None]:
    return lambda msg: print(prefix + msg, file=sys.stderr, flush=True)
