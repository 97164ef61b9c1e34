"""`bench --suite peers` (mtpspec/bench/peers.py): the record and table from timed runs, the
missing-llama-cpp-python message, and (when llama-cpp-python is installed) a short real run."""

from __future__ import annotations

import importlib.util

import pytest

from mtpspec.bench import peers
from mtpspec.bench.peers import EngineResult, Run, _agreement, _record, table


def _result(name, tokens, decode_s, prefill_s=0.1, forwards=None):
    r = EngineResult(name)
    r.runs = {0: [Run(list(t), prefill_s, decode_s, forwards) for t in tokens],
              1: [Run(list(t), prefill_s, 2 * decode_s, forwards) for t in tokens]}
    return r


def test_record_ratios_agreement_and_losslessness_flag():
    a = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    results = {
        "llama.cpp": _result("llama.cpp", a, 1.0),
        "mtpspec": _result("mtpspec", [[1, 2, 3, 0, 0], [6, 7, 8, 9, 10]], 0.5),
        "mtpspec+drafter": _result("mtpspec+drafter", [[1, 2, 3, 0, 0], [6, 7, 8, 9, 10]], 0.25, forwards=4),
    }
    rec = _record("x.gguf", a, results, 5, 2, 2, [])
    rows = {r["engine"]: r for r in rec["results"]}
    # decode: (10 tokens - 2 first tokens) / decode time; median over repeats (1.0 and 2.0 s)
    assert rows["llama.cpp"]["decode_tokens_per_s"] == pytest.approx(statistics_median(8 / 2.0, 8 / 4.0))
    assert rows["mtpspec"]["decode_vs_llama_cpp"] == pytest.approx(2.0)
    assert rows["mtpspec+drafter"]["decode_vs_llama_cpp"] == pytest.approx(4.0)
    assert rows["mtpspec"]["greedy_agreement_with_llama_cpp"] == pytest.approx(8 / 10)
    assert rows["mtpspec+drafter"]["equals_plain"] is True
    assert rows["mtpspec+drafter"]["tokens_per_target_forward"] == pytest.approx(8 / 8)
    assert "mtpspec+drafter" in table(rec)
    assert "greedy_agreement_with_fp32" not in rows["mtpspec"]  # no dense engine in this run
    # with the dense engine: the quantized engine's agreement with it is reported
    results["mtpspec-f32"] = _result("mtpspec-f32", [[1, 2, 9, 9, 9], [6, 7, 8, 9, 10]], 0.5)
    rows = {r["engine"]: r for r in _record("x.gguf", a, results, 5, 2, 2, [])["results"]}
    assert rows["mtpspec"]["greedy_agreement_with_fp32"] == pytest.approx(7 / 10)
    assert "vs mtpspec-f32" in table(_record("x.gguf", a, results, 5, 2, 2, []))


def statistics_median(*xs):
    import statistics

    return statistics.median(xs)


def test_agreement_counts_up_to_the_first_difference():
    assert _agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert _agreement([[1, 2]], [[1, 2]]) == 1.0


def test_without_llama_cpp_python_the_suite_says_how_to_install_it(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *a, **kw):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(peers.PeersUnavailable, match=r"pip install 'mtpspec\[peers\]'"):
        peers.llama_cpp_runner(tmp_path / "x.gguf", 1, 64)


def test_busy_machine_warning(monkeypatch):
    monkeypatch.setattr(peers, "_other_cpu_share", lambda: 0.9)
    assert "other processes use 90% of the CPU" in peers.machine_busy()
    monkeypatch.setattr(peers, "_other_cpu_share", lambda: 0.01)
    assert peers.machine_busy() is None


def test_other_processes_cpu_share_sees_a_busy_child():
    import subprocess
    import sys

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = peers._other_cpu_share(0.5)
    finally:
        spin.kill()
    if busy is None:
        pytest.skip("no /proc")
    assert busy > 0.3 / (peers.os.cpu_count() or 1)


def test_batched_groups_run_together_in_order_and_share_the_group_time(monkeypatch):
    calls = []

    def fake_runner(name, step_s):
        def run(prompts, new):
            calls.append((name, [p[0] for p in prompts]))
            return peers._split(0.2, step_s * new, [[p[0]] * new for p in prompts])
        return run

    monkeypatch.setattr(peers, "llama_cpp_runner", lambda g, t, n, batch, extra_bufts: fake_runner("llama.cpp", 0.1))
    monkeypatch.setattr(peers, "extra_bufts_work", lambda g: False)
    monkeypatch.setattr(peers, "batched_works", lambda g, b, extra: True)
    monkeypatch.setattr(peers, "mtpspec_runner", lambda e: fake_runner("mtpspec", 0.05))
    prompts = [[i, 0] for i in range(1, 7)]
    rec = peers.run_peers_bench("x.gguf", prompts, {"mtpspec": None}, new_tokens=4, repeats=2, threads=1, batch=3)
    timed = calls[2:]  # after one warm-up call per engine
    assert [c[1] for c in timed] == [[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]] * 2
    assert [c[0] for c in timed[:4]] == ["llama.cpp", "mtpspec", "mtpspec", "llama.cpp"]  # order rotates
    rows = {r["engine"]: r for r in rec["results"]}
    assert rec["batch"] == 3 and "batch 3" in table(rec)
    assert peers.NO_EXTRA_BUFTS in rec["warnings"]  # llama.cpp's crash-prone default is named in the record
    # per group: 3 sequences x 4 tokens; decode tok/s = (12 - 3) / decode time of the group
    assert rows["llama.cpp"]["decode_tokens_per_s"] == pytest.approx(9 / 0.4)
    assert rows["mtpspec"]["decode_vs_llama_cpp"] == pytest.approx(2.0)
    assert rows["mtpspec"]["wall_tokens_per_s"] == pytest.approx(12 / 0.4)
    assert rows["mtpspec"]["greedy_agreement_with_llama_cpp"] == 1.0
    with pytest.raises(ValueError, match="multiple of the batch size"):
        peers.run_peers_bench("x.gguf", prompts[:5], {"mtpspec": None}, new_tokens=4, repeats=1, threads=1, batch=3)


def test_when_batched_llama_cpp_crashes_the_batch_compares_against_mtpspec_plain(monkeypatch):
    """A crashing batched llama.cpp context (seen on an AMX Xeon) must not end the suite: the probe
    runs in a child, llama.cpp is left out, a warning says so and ratios go to mtpspec plain."""
    def fake_runner(step_s):
        def run(prompts, new):
            return peers._split(0.1, step_s * new, [[p[0]] * new for p in prompts])
        return run

    def llama_must_not_run(*a, **kw):
        raise AssertionError("the batched llama.cpp runner was built although its probe failed")

    monkeypatch.setattr(peers, "llama_cpp_runner", llama_must_not_run)
    monkeypatch.setattr(peers, "extra_bufts_work", lambda g: True)
    probed = []
    monkeypatch.setattr(peers, "batched_works", lambda g, b, extra: probed.append((b, extra)) or False)
    monkeypatch.setattr(peers, "mtpspec_runner", lambda e: fake_runner(e))
    prompts = [[i, 0] for i in range(1, 5)]
    rec = peers.run_peers_bench("x.gguf", prompts, {"mtpspec": 0.1, "mtpspec+drafter": 0.05}, new_tokens=4,
                                repeats=1, threads=1, batch=2)
    assert probed == [(2, True)]
    assert rec["baseline"] == "mtpspec" and peers.NO_BATCHED.format(batch=2) in rec["warnings"]
    rows = {r["engine"]: r for r in rec["results"]}
    assert set(rows) == {"mtpspec", "mtpspec+drafter"}
    assert rows["mtpspec+drafter"]["decode_vs_mtpspec"] == pytest.approx(2.0)
    assert "greedy_agreement_with_llama_cpp" not in rows["mtpspec"]
    assert "x = ratio to mtpspec plain" in table(rec)


def test_the_batched_probe_reports_a_crashing_child(monkeypatch, tmp_path):
    """`batched_works` is False when the child dies (here: llama_cpp is not importable in it, or the
    file is not a GGUF), instead of taking the calling process down."""
    assert peers.batched_works(tmp_path / "missing.gguf", 2) is False


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("batch", [1, 3])
def test_a_short_real_run_on_a_tiny_quantized_gguf(tmp_path, batch):
    import mtpspec
    from test_default_model import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "t.gguf", hidden=64, ffn=128, weight_types={"*": "Q8_0"})
    if not peers.extra_bufts_work(path) and not peers.extra_bufts_work(path, False):  # a segfault ends the run
        pytest.skip("this llama.cpp build crashes on this CPU even without its extra buffer types")
    engines = {"mtpspec": mtpspec.load(path, drafter=None, cache_dir=tmp_path / "c"),
               "mtpspec+drafter": mtpspec.load(path, drafter="ngram", cache_dir=tmp_path / "c")}
    prompts = [[5, 6, 7, 8, 5, 6, 7], [9, 3, 4], [3, 4, 5, 6, 7, 8, 9, 10, 11]][:batch]
    rec = peers.run_peers_bench(path, prompts, engines, new_tokens=12, repeats=1, threads=1, batch=batch)
    rows = {r["engine"]: r for r in rec["results"]}
    assert rows["mtpspec+drafter"]["equals_plain"] is True
    if rec["baseline"] == "llama.cpp":
        assert set(rows) == {"llama.cpp", "mtpspec", "mtpspec+drafter"}
        assert rec["batch"] == batch and rows["llama.cpp"]["decode_tokens_per_s"] > 0
    # llama.cpp's batched context gives each sequence the tokens it gives it alone
    extra = peers.extra_bufts_work(path)
    if batch > 1 and not peers.batched_works(path, batch, extra):  # in-process, a segfault ends the run
        assert rec["baseline"] == "mtpspec" and "llama.cpp" not in rows
        pytest.skip("this llama.cpp build crashes decoding several sequences in one context on this CPU")
    together = peers.llama_cpp_runner(path, 1, 64, batch, extra_bufts=extra)(prompts, 12)
    alone = [peers.llama_cpp_runner(path, 1, 64, extra_bufts=extra)([p], 12)[0] for p in prompts]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert all(len(r.tokens) == 12 for r in together)


@pytest.mark.parametrize("args, expected", [([], 2), (["--repeats", "3"], 3), (["--repeats", "1"], 1)])
def test_the_cli_gives_the_suite_the_repeats_asked_for(monkeypatch, args, expected):
    """`--repeats 3` used to be read as "not given" (3 was the CLI default) and ran the peers suite's 2."""
    from typer.testing import CliRunner

    from mtpspec import cli

    seen = []
    monkeypatch.setattr(cli, "_peers", lambda model, drafter, n, new, repeats, *a, **k: seen.append(repeats))
    r = CliRunner().invoke(cli.app, ["bench", "--suite", "peers", *args])
    assert r.exit_code == 0, r.output
    assert seen == [expected]


def test_the_cli_rejects_zero_repeats():
    from typer.testing import CliRunner

    from mtpspec import cli

    r = CliRunner().invoke(cli.app, ["bench", "--suite", "peers", "--repeats", "0"])
    assert r.exit_code == 2 and "--repeats must be >= 1" in r.output
