"""The adaptive draft length started cold for every prompt, as a single `mtpspec generate` starts:
plain vs speculative (default drafter with prompt lookup, adaptive K) on the broad benchmark's
prompts (2 per category, 128 tokens, batch 1), one prior acceptance per argument.

    .venv/bin/python docs/scripts/cold_adaptive.py 0.7 0.5 0.35
"""
import time, statistics, sys, mtpspec
from mtpspec.decoding import draft_length as dl
from mtpspec.bench.heldout import load_heldout, encode_prompt
plain = mtpspec.load(drafter=None); spec = mtpspec.load()
held = load_heldout(per_category=2)
prompts = [encode_prompt(spec, p) for ps in held.values() for p in ps]
orig = dl.AdaptiveDraftLength.__init__
priors = [float(x) for x in sys.argv[1:]] or [0.7, 0.5]
res = {p: [] for p in priors}
for e in (plain, spec):
    e.generate(prompts[0], max_new_tokens=16)
for ids in prompts:
    t = time.perf_counter(); plain.generate(ids, max_new_tokens=128); tp = time.perf_counter() - t
    for pr in priors:
        def init(self, *a, _pr=pr, **k):
            k["prior_acceptance"] = _pr; orig(self, *a, **k)
        dl.AdaptiveDraftLength.__init__ = init
        spec.plan._adaptive.clear()  # cold, as a fresh process
        t = time.perf_counter(); spec.generate(ids, max_new_tokens=128); ts = time.perf_counter() - t
        res[pr].append(tp / ts)
for pr, v in res.items():
    print(pr, "median", round(statistics.median(v), 3), "geomean", round(statistics.geometric_mean(v), 3), "min", round(min(v), 2), "max", round(max(v), 2))
