"""`run_plain_bench` end to end on a tiny random llama checkpoint (no timing thresholds).

The checkpoint has no tokenizer, so the bench uses its deterministic token-id prompts; a second
test passes token-id prompts explicitly.
"""

from __future__ import annotations

import json
import math

import pytest

from mtpspec.bench import run_plain_bench
from mtpspec.bench.records import compare_tokens
from mtpspec.errors import InputError

from tiny_models import tiny_hf_model

FAST = dict(max_new_tokens=8, repeats=1, batch_sizes=(1, 2), verify_repeats=3, verify_context=24,
            bandwidth_mb=16, bandwidth_runs=2, show_table=False)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    return folder


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_plain_bench_writes_complete_results(tiny_llama, tmp_path, capsys):
    out = tmp_path / "sub" / "plain.json"
    res = run_plain_bench(model=tiny_llama, dtypes=("float32", "bfloat16"), out=out, command="pytest", **{**FAST, "show_table": True})
    data = json.loads(out.read_text())
    for key in ("benchmark", "model", "command", "arguments", "machine", "versions", "kernel", "bandwidth",
                "runs", "roofline", "verify", "fp32_tokens_identical", "notes"):
        assert key in data, key
    assert data["command"] == "pytest"
    assert data["arguments"]["max_new_tokens"] == 8 and data["arguments"]["batch_sizes"] == [1, 2]
    for key in ("cpu_model", "logical_cores", "torch_threads"):
        assert key in data["machine"]
    assert {"torch", "transformers", "mtpspec"} <= set(data["versions"])
    assert "path" in data["kernel"]
    assert _positive(data["bandwidth"]["gb_per_s"])

    assert data["fp32_tokens_identical"] is True
    assert [(r["dtype"], r["batch_size"]) for r in data["runs"]] == [
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    for r in data["runs"]:
        assert r["prompts"].startswith("token-ids")
        for key in ("ours_tok_s", "hf_tok_s", "speedup", "ours_decode_tok_s"):
            assert _positive(r[key]), (key, r)
        assert len(r["ours_wall_s"]) == len(r["hf_wall_s"]) == 1
        assert 0 <= r["identical_prefix_fraction"] <= 1
        if r["dtype"] == "float32":
            assert r["tokens_identical"] and r["identity_asserted"]
            assert r["first_divergence"] == [None] * r["batch_size"]
    for r in data["roofline"]:
        assert r["tied_embeddings"] is True
        for key in ("weight_bytes_per_step", "roofline_tok_s", "ours_b1_tok_s", "ours_b1_fraction"):
            assert _positive(r[key]), (key, r)
    fp32, bf16 = data["roofline"]
    assert fp32["weight_bytes_per_step"] == 2 * bf16["weight_bytes_per_step"]
    for r in data["verify"]:
        assert r["tokens"] == 5 and r["context"] == 24
        for key in ("ours_t1_ms", "ours_tk_ms", "ours_ratio", "hf_t1_ms", "hf_tk_ms", "hf_ratio"):
            assert _positive(r[key]), (key, r)
    assert res["out"] == str(out)
    printed = capsys.readouterr().out
    assert "throughput" in printed and "roofline" in printed and "verify-pass" in printed


def test_plain_bench_token_id_prompts_without_output_file(tiny_llama):
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40))]
    res = run_plain_bench(model=tiny_llama, dtypes=("fp32",), prompts=prompts, out=None, **FAST)
    assert "out" not in res
    assert [r["prompt_tokens"] for r in res["runs"]] == [[5], [5, 30]]
    assert all(r["tokens_identical"] for r in res["runs"])


def test_bad_arguments_are_rejected(tiny_llama):
    with pytest.raises(InputError, match="max_new_tokens"):
        run_plain_bench(model=tiny_llama, **{**FAST, "max_new_tokens": 0})
    with pytest.raises(InputError, match="dtype"):
        run_plain_bench(model=tiny_llama, dtypes=("int8",), out=None, **{k: v for k, v in FAST.items()})


def test_compare_tokens():
    assert compare_tokens([[1, 2, 3]], [[1, 2, 3]])["identical"]
    c = compare_tokens([[1, 2, 3, 4], [5, 6]], [[1, 9, 3, 4], [5, 6]])
    assert not c["identical"]
    assert c["first_divergence"] == [1, None]
    assert c["identical_prefix_fraction"] == pytest.approx(3 / 6)
    assert c["identical_position_fraction"] == pytest.approx(5 / 6)


def test_interleave_rotates_the_order_and_drops_a_failing_runner():
    from mtpspec.bench.timing import Run, alternating_times, interleave

    calls, errors = [], {}

    def runner(name, fail_at=None):
        def go():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(name)
            return Run([[len(calls)]], 1.0, None)
        return go

    ref, got = interleave({"a": runner("a"), "b": runner("b"), "c": runner("c", fail_at=3)}, 3,
                          on_error=lambda name, e: errors.setdefault(name, str(e)))
    # warm-up a b c; repeat 1: a b c; repeat 2 (rotated by one): b c(fails) a; repeat 3: a b (c dropped)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "a", "b"]
    assert errors == {"c": "c"} and set(got) == {"a", "b"} and set(ref) == {"a", "b", "c"}
    assert [len(got["a"]), len(got["b"])] == [3, 3]
    with pytest.raises(RuntimeError):  # without on_error, a failure propagates
        interleave({"x": runner("x", fail_at=1)}, 1)

    order = []
    times = alternating_times({"p": lambda: order.append("p"), "q": lambda: order.append("q")}, repeats=2, warmup=1)
    assert order == ["p", "q", "q", "p", "p", "q"] and [len(t) for t in times.values()] == [2, 2]

def test_interleave_alternates_batch_runners_batch_by_batch():
    """Runners over the same batches alternate at every batch (order rotated per batch and per
    repeat); each run's tokens come back in batch order; a runner failing mid-run is dropped."""
    from mtpspec.bench.timing import Run, Runner, interleave

    calls, errors = [], {}

    class Fake(Runner):
        def __init__(self, name, fail_at=None):
            super().__init__(3)
            self.name, self.fail_at, self.n = name, fail_at, 0

        def start(self):
            self.done = {}

        def run_batch(self, i):
            calls.append(f"{self.name}{i}")
            self.n += 1
            if self.n == self.fail_at:
                raise RuntimeError(self.name)
            self.done[i] = [[10 * i]]

        def result(self):
            return Run([t for i in sorted(self.done) for t in self.done[i]], 1.0, None)

    ref, got = interleave({"a": Fake("a"), "b": Fake("b"), "c": Fake("c", fail_at=5)}, 2,
                          on_error=lambda name, e: errors.setdefault(name, str(e)))
    warm = ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1", "c2"]  # whole runs first (the reference)
    assert calls[:9] == warm
    # repeat 1: c's 5th batch (c1) fails and c is dropped; repeat 2 rotates by one more
    assert calls[9:] == ["a0", "b0", "c0", "b1", "c1", "a1", "a2", "b2", "b0", "a0", "a1", "b1", "b2", "a2"]
    assert errors == {"c": "c"} and set(got) == {"a", "b"}
    assert [r.tokens for r in got["a"]] == [[[0], [10], [20]]] * 2 and ref["a"] == [[0], [10], [20]]

