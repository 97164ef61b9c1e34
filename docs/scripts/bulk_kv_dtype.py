"""Bulk mode's bfloat16 K/V cache against an fp32 one (`Decoder.new_cache` under
`kernels.bulk_matmuls`): answering speed of `distill_recorded` (what `train-drafter` runs to answer
a shard), alternated in one process, and how often the deployed target's own greedy choice (a
pass outside bulk mode: the quantized kernels, fp32 K/V) differs from the answer tokens written.
The broad benchmark's first N prompts cut to 200 tokens, answers up to 128 tokens, the default model.

    .venv/bin/python docs/scripts/bulk_kv_dtype.py [SLOTS=128] [N=256] [REPEATS=3]
"""
import statistics
import sys
import time

import mtpspec
from mtpspec.bench.heldout import encode_prompt, load_heldout
from mtpspec.cache import CacheLayout, KVCache
from mtpspec.kernels import bulk_matmuls
from mtpspec.models.decoder import Decoder
from mtpspec.train.harvest import answer_agreement, distill_recorded, harvest

slots, n, repeats = (int(a) for a in (sys.argv[1:] + ["128", "256", "3"][len(sys.argv) - 1 :])[:3])
eng = mtpspec.load(drafter=None)
prompts = [encode_prompt(eng, p)[:200] for ps in load_heldout().values() for p in ps][:n]
bf16_cache = Decoder.new_cache


def fp32_cache(self, batch_size, capacity):  # the cache before bulk mode chose bfloat16
    layouts = {i: CacheLayout(self.cfg.layers[i].n_kv_heads, self.cfg.layers[i].head_dim) for i in self.cfg.cache_layers()}
    return KVCache(layouts, batch_size, capacity, dtype=self.dtype, device=self.device)


speed = {"fp32": [], "bf16": []}
answers = {}
for _ in range(repeats):
    for name in speed:
        Decoder.new_cache = fp32_cache if name == "fp32" else bf16_cache
        with bulk_matmuls():
            t0 = time.time()
            answers[name], _ = distill_recorded(eng, prompts, 128, 512, slots, ["full_attention"])
            dt = time.time() - t0
        tokens = sum(len(a) for a in answers[name])
        speed[name].append(tokens / dt)
        print(f"{name} K/V: {tokens} tokens in {dt:.1f}s = {tokens / dt:.0f} tok/s", flush=True)
Decoder.new_cache = bf16_cache
for name, got in answers.items():
    acts = harvest(eng.model, [p + a for p, a in zip(prompts, got)], [len(p) - 1 for p in prompts], ["full_attention"])
    tokens, differ = answer_agreement(acts, [len(p) for p in prompts])
    print(f"{name} K/V: median {statistics.median(speed[name]):.0f} tok/s; the deployed target's greedy choice "
          f"differs from {differ} of {tokens} answer tokens ({differ / tokens:.2%})", flush=True)
