"""Weight-streaming throughput of F.linear vs mtpspec.kernels.Linear.

    python -m mtpspec.kernels.bench_linear [--mb 400] [--reps 5] [--ms 1,2,5,8,16]

Builds a set of SmolLM2-135M-like layers (576x576, 192x576, 1536x576,
576x1536, fused 960x576 and 3072x576, plus a 49152x576 LM head) totalling
about --mb megabytes per dtype (far larger than cache), runs every layer once
per pass and reports weight bytes / best pass time in GB/s.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mtpspec.kernels import Linear, kernel_info

BLOCK = [(576, 576), (192, 576), (1536, 576), (576, 1536), (960, 576), (3072, 576)]  # (out, in)
HEAD = (49152, 576)


def shapes_for(nbytes: float, elem: int) -> list[tuple[int, int]]:
    shapes = [HEAD]
    total = HEAD[0] * HEAD[1] * elem
    while total < nbytes:
        for s in BLOCK:
            shapes.append(s)
            total += s[0] * s[1] * elem
    return shapes


def gbps(fns, nbytes: int, reps: int) -> float:
    for f in fns:  # warm-up
        f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for f in fns:
            f()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=400)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ms", default="1,2,5,8,16")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ms = [int(m) for m in a.ms.split(",")]
    torch.manual_seed(0)
    print("kernel_info:", kernel_info())
    for dt in (torch.float32, torch.bfloat16):
        elem = torch.tensor([], dtype=dt).element_size()
        shapes = shapes_for(a.mb * 1e6, elem)
        layers = []
        for o, i in shapes:
            l = Linear(i, o, bias=False, dtype=dt)
            layers.append(l)
        nbytes = sum(o * i * elem for o, i in shapes)
        ws = [l.weight.detach().clone() for l in layers]  # torch baseline copies
        ref_sum = gbps([lambda: sum(w.sum() for w in ws)], nbytes, a.reps)
        print(f"\n{dt}: {len(shapes)} layers, {nbytes / 1e6:.0f} MB   (tensor.sum(): {ref_sum:.1f} GB/s)")
        print(f"{'M':>4} {'F.linear':>10} {'Linear':>10} {'speedup':>8}")
        results = {}
        for M in ms:
            xs = {i: torch.randn(M, i, dtype=dt) for _, i in shapes}
            results[M] = gbps([lambda w=w: F.linear(xs[w.shape[1]], w) for w in ws], nbytes, a.reps)
        del ws  # keep only one copy of the weights alive at a time
        for l in layers:
            l.pack()
        with torch.inference_mode():
            for M in ms:
                xs = {i: torch.randn(M, i, dtype=dt) for _, i in shapes}
                ours = gbps([lambda l=l: l(xs[l.in_features]) for l in layers], nbytes, a.reps)
                print(f"{M:>4} {results[M]:>10.1f} {ours:>10.1f} {ours / results[M]:>7.2f}x")
        del layers


if __name__ == "__main__":
    main()
