"""Benchmarks. `run_plain_bench` (plain decoding, ours vs transformers) backs `mtpspec bench`."""

from .plain import BenchMismatch, run_plain_bench

__all__ = ["run_plain_bench", "BenchMismatch"]
