"""Benchmarks behind `mtpspec bench`: `plain` (plain decoding, ours vs transformers), `spec`
(speculative vs plain decoding), `gemma4` (Gemma 4-shaped random models); `serve.bench` benches
the server. Shared: `timing` (timed runs, interleaving), `machine` (what ran), `records` (results
files, tables), `arguments`."""

from .plain import run_plain_bench
from .records import BenchMismatch

__all__ = ["run_plain_bench", "BenchMismatch"]
