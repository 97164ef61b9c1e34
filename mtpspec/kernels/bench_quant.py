"""Weight-only quantized matmuls on CPU: our kernel (quant_gemm.cpp) against PyTorch's own
weight-only int8 / int4 ops (the ones gpt-fast and torchao call) and dense fp32 `F.linear`.

    python -m mtpspec.kernels.bench_quant [--shapes 3072x576,576x1536] [--ms 1,4,16] [--threads 2]

For each weight shape (out x in) and row count M: median microseconds per call of
  ours int4 / int8        `quant_linear` (4-bit q with fp32 scale and offset per 32 inputs; int8)
  torch int8              `aten._weight_int8pack_mm` (int8 weight, one scale per output row)
  torch int4              `aten._weight_int4pack_mm_for_cpu` (4-bit, groups of 32, fp32 activations)
  dense fp32              `F.linear`
Only speed is compared (the weights are random); run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mtpspec.kernels import _ext
from mtpspec.kernels.quant import QuantLinear, quantize_weight


def median_us(fn, calls: int = 100, repeats: int = 5) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    return sorted(times)[repeats // 2] * 1e6


def candidates(n: int, k: int, m: int, ext) -> dict:
    """name -> zero-argument call, for one weight shape and row count."""
    w = torch.randn(n, k) * 0.05
    x = torch.randn(m, k)
    q4 = QuantLinear(quantize_weight(w, "int4"))
    q8 = QuantLinear(quantize_weight(w, "int8"))
    s8 = w.abs().amax(1) / 127
    w8 = (w / s8[:, None]).round().clamp(-127, 127).to(torch.int8)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
    sz = torch.randn(k // 32, n, 2) * 0.01
    return {
        "ours int4": lambda: ext.quant_linear(x, q4.packed, None, n, k, 4, 32, q4.scale_mode),
        "ours int8": lambda: ext.quant_linear(x, q8.packed, None, n, k, 8, 32, q8.scale_mode),
        "torch int8": lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8),
        "torch int4": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 32, sz),
        "dense fp32": lambda: F.linear(x, w),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="3072x576,576x1536,49152x576")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ext = _ext()
    if ext is None:
        raise SystemExit("the compiled kernels are unavailable (see mtpspec.kernels.kernel_info())")
    print(f"threads {torch.get_num_threads()}, kernel path {ext.quant_isa()}; microseconds per call (median)")
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in a.ms.split(",")):
            res = {name: median_us(fn) for name, fn in candidates(n, k, m, ext).items()}
            print(f"{n}x{k} M={m:<3} " + "  ".join(f"{name} {us:8.0f}" for name, us in res.items()), flush=True)


if __name__ == "__main__":
    main()
