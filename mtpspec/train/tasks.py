"""Task prompts across the kinds of requests real chat traffic holds: the `tasks` data recipe.

Prompts the target writes itself (self_instruct.py) follow what a small chat model imagines its
users ask: mostly short questions and chit-chat. Real traffic also asks it to translate a
sentence, summarize or answer questions about a text it is given, pull facts out of one, do
arithmetic, play a role, rewrite, reason through a puzzle, or explain code; a drafter that never
saw the target answer such requests accepts little on them. This recipe builds such requests
from templates filled with material that is on every machine with our dependencies: sentences
and whole conversations of the `chitchat-dataset` training split (never its held-out split),
docstrings and short functions of the Python standard library, and random numbers. The target
answers them with self-distillation like any other prompt.

`task_prompts(seed)` returns `(key, messages)` pairs, `PER_CATEGORY` per category of
`CATEGORIES`, in a fixed order for a seed; keys are "<category>/<n>". A held-out split
(`held_out`, by text) of the material and of the prompts is never trained on, whatever the seed:
`task_prompts(held=True)` draws from it, and `drafters/heldout-tasks.jsonl` holds 3 per category.
None of them is drawn from the broad benchmark (`mtpspec/bench/heldout/`): its prompts
and passages were written by hand and share no run of 8 words with these (tests check it); the
task *kinds* overlap on purpose, since the benchmark samples the kinds of real traffic.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import random
import re
import sysconfig
from collections import Counter
from functools import lru_cache
from pathlib import Path

CATEGORIES = ("translation", "summarization", "extraction", "passage_qa", "math", "roleplay", "writing",
              "rewriting", "reasoning", "code")
PER_CATEGORY = 300
HELD_OUT = 0.05  # fraction of the material and of the prompts kept out of training

_STOP = set("""the a an and or but if of to in on at for with from by as is are was were be been being it its
this that these those i you he she we they me him her us them my your his our their what which who whom
when where why how not no yes do does did have has had will would can could should may might must shall
there here than then so just very also about into over after before more most some any all each every
other such only own same too out up down off again further once really like get got know think going
one two three don't it's i'm you're that's""".split())

# ---- material ----------------------------------------------------------------------------------


def held_out(prompt: str) -> bool:
    """Whether a task prompt is kept out of training: a stable hash of its text, so that no seed
    of the recipe ever trains on a held-out prompt."""
    return int(hashlib.sha1(("tasks/" + prompt).encode()).hexdigest()[:8], 16) < HELD_OUT * 0xFFFFFFFF


def _words(text: str) -> int:
    return len(text.split())


@lru_cache(maxsize=1)
def _conversations() -> tuple[tuple[str, ...], ...]:
    from .data import _training_conversations

    return tuple(tuple(msgs) for _, msgs in _training_conversations())


def _split(held: bool) -> tuple[list[tuple[str, ...]], set[str]]:
    """The conversations of one split (by `held_out` of a whole conversation's text), and the
    messages of the other split's conversations (a message both hold is nobody's material)."""
    mine, other = [], set()
    for msgs in _conversations():
        if held_out("\n".join(msgs)) == held:
            mine.append(msgs)
        else:
            other.update(" ".join(m.split()) for m in msgs)
    return mine, other


def _sentences(held: bool = False) -> list[str]:
    """Chat messages that read as one or two plain sentences (6-24 words, ending in punctuation)."""
    convs, other = _split(held)
    out = []
    for msgs in convs:
        for m in msgs:
            m = " ".join(m.split())
            if (6 <= _words(m) <= 24 and m[-1] in ".!?" and "http" not in m and m[0].isupper()
                    and m not in other):
                out.append(m)
    return out


def _transcripts(lo: int, hi: int, held: bool = False) -> list[str]:
    """Conversations as "A: ... / B: ..." transcripts of lo-hi words (consecutive turns from the
    start, none the other split also holds)."""
    convs, other = _split(held)
    out = []
    for msgs in convs:
        lines, n = [], 0
        for i, m in enumerate(msgs):
            m = " ".join(m.split())
            if n + _words(m) > hi or m in other:
                break
            lines.append(f"{'AB'[i % 2]}: {m}")
            n += _words(m)
        if n >= lo and len(lines) >= 4:
            out.append("\n".join(lines))
    return out


@lru_cache(maxsize=1)
def _stdlib_material() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """From the standard library's top-level modules: prose docstrings (modules, classes,
    functions) of 50-220 words, and small functions (4-20 lines once their docstring is dropped)
    as source."""
    docs, funcs = [], []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and 50 <= _words(doc) <= 220 and ">>>" not in doc and "::" not in doc:  # prose, not doctests
                docs.append(doc.strip())
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                continue
            fn = copy.copy(node)  # shallow: only its body list is replaced (deep copies took half of the ~6 s here)
            if doc is not None:
                fn.body = fn.body[1:]
            if fn.body:
                lines = ast.unparse(fn).splitlines()
                if 4 <= len(lines) <= 20 and max(len(x) for x in lines) <= 100:
                    funcs.append("\n".join(lines))
    return tuple(docs), tuple(funcs)


def _keyword(text: str, rng: random.Random) -> str | None:
    """A content word the text uses at least twice (for "what does the text say about X")."""
    words = [w for w in re.findall(r"[A-Za-z][a-z]{4,}", text) if w.lower() not in _STOP]
    common = [w for w, c in Counter(w.lower() for w in words).items() if c >= 2]
    return rng.choice(sorted(common)) if common else None


# ---- the categories ----------------------------------------------------------------------------
_LANGS = ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Chinese", "Japanese", "Russian",
          "Korean", "Polish", "Turkish", "Swedish", "Greek")


def _translation(rng: random.Random, sents: list[str]) -> list[dict]:
    s, lang = rng.choice(sents), rng.choice(_LANGS)
    form = rng.choice([
        'Translate into {l}: "{s}"', 'Translate this sentence to {l}:\n\n{s}', 'How would you say "{s}" in {l}?',
        'Can you translate "{s}" into {l} for me?', '{s}\n\nTranslate the text above into {l}.',
        'Please give me the {l} translation of: {s}', 'Translate to {l}, keeping the tone casual: "{s}"',
        'What is "{s}" in {l}? Give the translation and a word-by-word gloss.'])
    return [{"role": "user", "content": form.format(l=lang, s=s)}]


def _passage(rng: random.Random, transcripts: list[str], docs: tuple[str, ...]) -> tuple[str, str]:
    return ("conversation", rng.choice(transcripts)) if rng.random() < 0.55 else ("text", rng.choice(docs))


def _summarization(rng, transcripts, docs) -> list[dict]:
    kind, p = _passage(rng, transcripts, docs)
    how = rng.choice(["in one sentence", "in two sentences", "in three bullet points", "in a short paragraph",
                      "in under 40 words", "for someone who has not read it", "as a headline and one sentence"])
    form = rng.choice([
        "Summarize the following {k} {h}:\n\n{p}", "{p}\n\nSummarize this {k} {h}.",
        "Can you give me a summary of this {k}, {h}?\n\n{p}", "TL;DR of this {k}, please:\n\n{p}",
        "Here is a {k}:\n\n{p}\n\nWhat is it about? Answer {h}."])
    return [{"role": "user", "content": form.format(k=kind, h=how, p=p)}]


def _extraction(rng, transcripts, docs) -> list[dict]:
    kind, p = _passage(rng, transcripts, docs)
    ask = rng.choice({
        "conversation": ["List every question that A asks B.", "List the topics the two people talk about.",
                         "Extract every place, person or product named in the conversation.",
                         "Give a JSON object with the keys \"topic\", \"mood\" and \"questions_asked\".",
                         "What does each speaker say about themselves? One bullet per fact.",
                         "Label each message as question, answer, opinion or other."],
        "text": ["List the names of functions, classes or modules the text mentions.",
                 "Extract every parameter or argument the text describes, with what it does.",
                 "Give a JSON object with the keys \"subject\", \"inputs\" and \"outputs\".",
                 "List the main points of the text as bullets.", "Make a table of the terms the text defines.",
                 "Which errors or exceptions does the text mention?"]}[kind])
    form = rng.choice(["{a}\n\n{p}", "{p}\n\n{a}", "Read the {k} below. {a}\n\n{p}"])
    return [{"role": "user", "content": form.format(a=ask, p=p, k=kind)}]


def _passage_qa(rng, transcripts, docs) -> list[dict]:
    kind, p = _passage(rng, transcripts, docs)
    kw = _keyword(p, rng)
    q = rng.choice([f"What does the {kind} say about {kw}?" if kw else f"What is the main point of the {kind}?",
                    f"What is the main point of the {kind}?", f"Is there anything in the {kind} that seems unclear?",
                    f"Who would find this {kind} useful, and why?", f"What happens at the end of the {kind}?",
                    f"Based only on the {kind}, explain {kw} in simple words." if kw else f"What is the {kind} about?"])
    form = rng.choice(["{p}\n\nQuestion: {q}", "Read this {k} and answer the question after it.\n\n{p}\n\n{q}",
                       "{q}\n\n{p}", "I was sent this {k}:\n\n{p}\n\n{q}"])
    return [{"role": "user", "content": form.format(p=p, q=q, k=kind)}]


_ITEMS = ("jacket", "pair of shoes", "lamp", "backpack", "bicycle", "coffee maker", "desk chair", "phone case",
          "board game", "tent", "watch", "blender")
_UNITS = (("kilometers", "miles"), ("miles", "kilometers"), ("pounds", "kilograms"), ("kilograms", "pounds"),
          ("liters", "gallons"), ("feet", "meters"), ("Celsius", "Fahrenheit"), ("Fahrenheit", "Celsius"),
          ("hours", "minutes"), ("inches", "centimeters"), ("cups", "milliliters"), ("days", "hours"))


def _math(rng: random.Random, *_) -> list[dict]:
    r = rng.randint
    a, b, c = r(11, 99), r(3, 48), r(2, 19)
    p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 60, 75]), r(2, 60) * 10
    u1, u2 = rng.choice(_UNITS)
    q = rng.choice([
        f"What is {a} times {b}?", f"Calculate {a * c} divided by {c}.", f"What is {a} + {b} - {c}?",
        f"What is {p}% of {n}?", f"A {rng.choice(_ITEMS)} costs ${n}. It is {p}% off today. What do I pay?",
        f"Solve for x: {c}x + {b} = {c * a + b}", f"Convert {r(2, 90)} {u1} to {u2}.",
        f"A car drives {a * c} km in {c} hours. What is its average speed?",
        f"What is {c}/{b} + 1/{c}? Give the answer as a fraction.", f"Is {r(20, 500)} a prime number? Explain.",
        f"What is the average of {', '.join(str(r(1, 100)) for _ in range(r(3, 6)))}?",
        f"I saved ${b} a week for {a} weeks. How much did I save?",
        f"Round {r(100, 99999) / 100} to the nearest whole number.", f"What is {b} squared?",
        f"A recipe for {c} people needs {b * 10} grams of flour. How much for {c + r(1, 6)} people?",
        f"What is the derivative of {c}x^{r(2, 5)} + {b}x?", f"If {a} apples cost ${c}, how much do {b} apples cost?",
        f"Simplify {c * b}/{c * a}.", f"What is {n} minus {p}% of {n}?",
        f"My bill is ${a}.{r(10, 99)}. How much is a {p if p <= 25 else 20}% tip?"])
    if rng.random() < 0.2:
        q = rng.choice(["quick question: ", "pls help, ", "Can you work this out step by step? "]) + q[0].lower() + q[1:]
    return [{"role": "user", "content": q}]


_ROLES = ("a pirate captain", "a tour guide in Lisbon", "a job interviewer for a bakery", "a help desk worker at a bank",
          "a medieval knight", "a detective in the 1920s", "a personal trainer", "a chef",
          "a strict but kind math teacher", "a travel agent", "a barista", "a librarian", "an astronaut on the moon",
          "the game master of a fantasy adventure", "a Spanish tutor", "a museum guide", "a football coach",
          "a wise old wizard", "a car salesperson", "a hotel receptionist", "a doctor at a check-up", "a robot butler",
          "a news reporter", "a park ranger", "a shopkeeper in a small village", "Sherlock Holmes")
_ROLE_ASKS = ("Greet me and ask what I need.", "Stay in character and tell me about your day.",
              "I am a new customer. Start the conversation.", "Answer my first question: what do you recommend?",
              "Give me advice on {t}, in character.", "Describe where we are right now.",
              "Tell me a short story about {t}.", "Ask me three questions, one at a time. Start with the first.",
              "I just made a mistake. React in character.", "Explain {t} the way you would.")


def _roleplay(rng: random.Random, topics: list[str], *_) -> list[dict]:
    role, ask = rng.choice(_ROLES), rng.choice(_ROLE_ASKS).format(t=rng.choice(topics))
    form = rng.choice(["You are {r}. {a}", "Pretend you are {r}. {a}", "Let's play a game: you are {r}. {a}",
                       "Act as {r}. {a} Keep it short."])
    return [{"role": "user", "content": form.format(r=role, a=ask)}]


_WRITE_KINDS = ("a short email", "a text message", "a thank-you note", "a birthday message", "an apology",
                "an invitation", "a product description", "the opening of a cover letter", "a toast", "a limerick",
                "a haiku", "a very short story", "a social media post", "a review", "a slogan", "a speech opening",
                "a letter of complaint", "a packing list", "a to-do list", "a motivational message")
_WRITE_ABOUT = ("to my landlord about a broken heater", "for a friend who just got a new job", "about a lost cat",
                "for a coffee shop opening next week", "to a coworker who covered my shift", "about {t}",
                "about {t}", "about {t}", "for my grandmother's 80th birthday", "to my team about a delayed project",
                "for a handmade wooden chair", "about a rainy Sunday", "to a neighbor about loud music",
                "for a school bake sale", "to cancel a gym membership", "for a hiking trip", "about learning to swim")


def _writing(rng: random.Random, topics: list[str], *_) -> list[dict]:
    kind, about = rng.choice(_WRITE_KINDS), rng.choice(_WRITE_ABOUT).format(t=rng.choice(topics))
    extra = rng.choice(["", "", " Keep it under 100 words.", " Make it funny.", " Use a warm tone.",
                        " Make it sound professional.", " Use simple words."])
    form = rng.choice(["Write {k} {a}.{e}", "Can you write {k} {a}?{e}", "I need {k} {a}.{e}", "Help me write {k} {a}.{e}"])
    return [{"role": "user", "content": form.format(k=kind, a=about, e=extra)}]


def _rewriting(rng: random.Random, sents: list[str]) -> list[dict]:
    s = rng.choice(sents)
    how = rng.choice(["more formal", "more polite", "friendlier", "more concise", "more exciting", "clearer",
                      "suitable for a work email", "in the past tense", "in simple English for a child"])
    form = rng.choice(['Rewrite this so it sounds {h}: "{s}"', "Make this {h}:\n\n{s}",
                       'Fix any grammar or spelling mistakes: "{s}"', '"{s}"\n\nParaphrase this sentence.',
                       'Turn this into a question: "{s}"', "Give me three other ways to say: {s}"])
    return [{"role": "user", "content": form.format(h=how, s=s)}]


_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemi", "Leo", "Mia",
          "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe")
_CHOICES = (("take the bus", "ride my bike", "it is raining lightly"), ("rent", "buy a house", "I might move in two years"),
            ("study in the morning", "study at night", "I work an afternoon shift"),
            ("buy a new laptop", "repair my old one", "the repair costs half the price"),
            ("adopt a dog", "adopt a cat", "I live in a small apartment"),
            ("learn Python", "learn JavaScript", "I want to build websites"),
            ("cook at home", "order takeout", "I have 20 minutes and some eggs"),
            ("go to the party", "stay home", "I have an exam tomorrow"))


def _reasoning(rng: random.Random, *_) -> list[dict]:
    x, y, z = rng.sample(_NAMES, 3)
    r = rng.randint
    o1, o2, cond = rng.choice(_CHOICES)
    n, m = r(3, 9), r(2, 6)
    q = rng.choice([
        f"{x} is taller than {y}, and {y} is taller than {z}. Who is the shortest?",
        f"{x} has {n} marbles, gives {m} to {y}, then finds {r(1, 5)} more. How many does {x} have now?",
        f"If it takes {n} minutes to boil one egg, how long does it take to boil {m} eggs in the same pot?",
        f"Should I {o1} or {o2} if {cond}? Think it through.",
        f"What comes next in the sequence {', '.join(str(n + i * m) for i in range(4))}, ...?",
        f"{x} is older than {y}. {z} is younger than {y}. Is {x} older than {z}?",
        f"All {rng.choice(['bloops', 'zims', 'tarks'])} are {rng.choice(['razzies', 'flons', 'mips'])}. "
        f"Some razzies are blue. Does it follow that some bloops are blue?",
        f"A shop opens at {r(7, 10)} am and closes at {r(5, 9)} pm. How many hours is it open?",
        f"In a vacuum, which lands first when dropped together: a {rng.choice(['coin', 'hammer', 'ball'])} or a "
        f"{rng.choice(['feather', 'sheet of paper', 'leaf'])}?",
        f"{x}, {y} and {z} finish a race. {y} is not first, and {z} finishes right after {x}. Who wins?",
        f"I have {n} socks of each of {m} colors in a drawer. How many must I take in the dark to be sure of a pair?",
        f"Why might a plant on a windowsill grow toward the glass?"])
    return [{"role": "user", "content": q}]


_CODE_TASKS = ("reverses a string", "checks whether a number is prime", "counts the vowels in a string",
               "returns the largest number in a list", "removes duplicates from a list while keeping the order",
               "reads a CSV file and prints each row", "converts Celsius to Fahrenheit",
               "checks whether a word is a palindrome", "merges two sorted lists", "computes the factorial of n",
               "finds the most common word in a text", "flattens a nested list", "validates an email address",
               "returns the n-th Fibonacci number", "sorts a list of dictionaries by a key",
               "counts how often each character appears", "splits a list into chunks of size n",
               "returns the second largest number", "capitalizes every word in a sentence",
               "sums the digits of an integer")
_LANGS_CODE = ("Python", "Python", "Python", "JavaScript", "Java", "C", "Go", "Rust", "bash")


def _code(rng: random.Random, funcs: tuple[str, ...]) -> list[dict]:
    if rng.random() < 0.5:
        fn = rng.choice(funcs)
        ask = rng.choice(["Explain what this Python function does:", "Add comments to this code:",
                          "Is there a bug in this function? If so, fix it.", "Write a docstring for this function:",
                          "What is the time complexity of this function?", "Rewrite this function to be easier to read:",
                          "Write a unit test for this function:"])
        text = rng.choice(["{a}\n\n```python\n{f}\n```", "```python\n{f}\n```\n\n{a}"]).format(a=ask, f=fn)
    else:
        lang, task = rng.choice(_LANGS_CODE), rng.choice(_CODE_TASKS)
        text = rng.choice(["Write a {l} function that {t}.", "How do I write a function in {l} that {t}?",
                           "Give me {l} code that {t}, with a short explanation.",
                           "Write a {l} function that {t}. Include an example call."]).format(l=lang, t=task)
    return [{"role": "user", "content": text}]


def task_prompts(seed: int = 0, held: bool = False, per_category: int = PER_CATEGORY) -> list[tuple[str, list[dict]]]:
    """`per_category` prompts of every category in `CATEGORIES`, as (key, messages), deterministic
    for a seed: of the training split, or of the held-out split if `held`. The material (sentences,
    conversations, docstrings, functions) is split by `held_out` of its text, and so is every
    prompt: a held-out prompt never shares its material with a training one, whatever the seeds."""
    from .data import _TOPICS

    def pool(items):
        return [x for x in items if held_out(x) == held]  # chat material is split by conversation instead

    topics = [t.strip() for t in _TOPICS.split(";") if t.strip()]
    sents = _sentences(held)
    transcripts = _transcripts(60, 220, held) + _transcripts(150, 260, held)
    docs, funcs = (tuple(pool(x)) for x in _stdlib_material())
    makers = {
        "translation": lambda r: _translation(r, sents), "summarization": lambda r: _summarization(r, transcripts, docs),
        "extraction": lambda r: _extraction(r, transcripts, docs), "passage_qa": lambda r: _passage_qa(r, transcripts, docs),
        "math": _math, "roleplay": lambda r: _roleplay(r, topics), "writing": lambda r: _writing(r, topics),
        "rewriting": lambda r: _rewriting(r, sents), "reasoning": _reasoning, "code": lambda r: _code(r, funcs)}
    out = []
    for cat in CATEGORIES:
        rng = random.Random(f"tasks/{seed}/{cat}/{'held' if held else 'train'}")
        seen: set[str] = set()
        i = tries = 0
        while i < per_category and tries < 50 * per_category:
            tries += 1
            msgs = makers[cat](rng)
            text = msgs[-1]["content"]
            if text in seen or held_out(text) != held:
                continue
            seen.add(text)
            out.append((f"{cat}/{i}", msgs))
            i += 1
    return out
