"""Answering speed of `train-drafter`'s self-distillation (`distill_recorded` in bulk mode, as a
shard is answered) by rows decoded at once: the broad benchmark's first N prompts cut to 200
tokens, answers up to 128 tokens, the default model. `prof` as a third argument: a cProfile of
the run instead (cumulative and own time).

    .venv/bin/python docs/scripts/generation_rows.py 64 256; ... 128 256; ... 256 256
    .venv/bin/python docs/scripts/generation_rows.py 128 128 prof
"""
import cProfile
import pstats
import sys
import time

import mtpspec
from mtpspec.bench.heldout import encode_prompt, load_heldout
from mtpspec.kernels import bulk_matmuls
from mtpspec.train.harvest import distill_recorded

slots = int(sys.argv[1]) if len(sys.argv) > 1 else 128
n = int(sys.argv[2]) if len(sys.argv) > 2 else 128
eng = mtpspec.load(drafter=None)
prompts = [encode_prompt(eng, p)[:200] for ps in load_heldout().values() for p in ps][:n]


def run() -> None:
    with bulk_matmuls():
        t0 = time.time()
        answers, _ = distill_recorded(eng, prompts, 128, 512, slots, ["full_attention"])
        dt = time.time() - t0
    tokens = sum(len(a) for a in answers)
    print(f"slots {slots}: {len(prompts)} prompts, {tokens} tokens in {dt:.1f}s = {tokens / dt:.0f} tok/s", flush=True)


if len(sys.argv) > 3 and sys.argv[3] == "prof":
    cProfile.run("run()", "/tmp/generation_rows.prof")
    stats = pstats.Stats("/tmp/generation_rows.prof")
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(30)
else:
    run()
