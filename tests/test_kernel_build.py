"""How the C++ kernels are found or built (mtpspec/kernels/__init__.py): an interrupted build never
hangs a later run, a failed build warns once with the reason and the cost, a stale in-place build
is not used, and kernel_info() / the bench tables say which path ran."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mtpspec.kernels as K
from mtpspec.bench.plain import kernel_summary

REPO = Path(__file__).resolve().parents[1]
INFO = "import json, mtpspec.kernels as K; print(json.dumps(K.kernel_info()))"


def _env(ext_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MTPSPEC_KERNELS", "PYTHONPATH")}
    env.update(TORCH_EXTENSIONS_DIR=str(ext_dir), OMP_WAIT_POLICY="passive", **extra)
    return env


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _start_and_kill_mid_compile(code: str, cwd: Path, env: dict, ext_dir: Path) -> None:
    """Run `code` (a kernel build) and kill -9 its python process once the compiler is running,
    as a user's Ctrl-Z + kill, a closed terminal or an OOM kill would."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(ext_dir.rglob("build.ninja")):  # written just before ninja starts the compiler
            assert proc.poll() is None, "the build finished or failed before it could be interrupted"
            assert time.monotonic() < deadline, "the build did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, "the build finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)  # the python process only, as kill -9 <pid> does
        proc.wait()
    finally:
        try:  # then its orphaned ninja / compiler (only the processes of the session started above)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert list(ext_dir.rglob("lock")), "the interrupted build left no lock file behind"


def test_killed_build_does_not_hang_the_next_run(tmp_path):
    """Issue 13 item 8: a first run killed (kill -9) while it compiles the kernels. The old code
    left torch's lock file in the shared build directory, and every later run waited on it forever.
    Now the next run does not wait: here its compiler is broken, so it falls back to torch at once,
    with the warning (test_jit_build_after_a_killed_build: it compiles, publishes and reuses)."""
    ext_dir = tmp_path / "torch_extensions"
    env = _env(ext_dir, MTPSPEC_KERNELS="jit")  # no prebuilt extension: compile, as a source checkout
    _start_and_kill_mid_compile("import mtpspec.kernels as K; K._ext()", tmp_path, env, ext_dir)

    fake_cxx = tmp_path / "broken-c++"
    fake_cxx.write_text("#!/bin/sh\necho 'broken-c++: cannot compile' >&2\nexit 1\n")
    fake_cxx.chmod(0o755)
    try:
        r = subprocess.run([sys.executable, "-c", INFO], cwd=tmp_path, env={**env, "CXX": str(fake_cxx)},
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the run after an interrupted kernel build hung (waited 120 s)")
    assert r.returncode == 0, r.stderr
    info = _last_json(r.stdout)
    assert info["path"] == "torch" and "broken-c++" in info["reason"], info
    assert "C++ kernels unavailable" in r.stderr
    # the killed run's private build directory was cleaned up
    assert [p.name for p in (ext_dir / "mtpspec").iterdir() if p.name.startswith("build-")] == []


TINY = """#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def test_jit_build_after_a_killed_build(tmp_path):
    """The run-time build (`_jit_build`, on a tiny extension to stay fast): killed mid-compile, the
    next build compiles and publishes the library, and later runs load it without compiling."""
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    ext_dir = tmp_path / "torch_extensions"
    env = _env(ext_dir)
    code = ("import json, sys, time, mtpspec.kernels as K; t = time.perf_counter(); "
            f"m, f = K._jit_build({str(src)!r}, 'mtpspec_tiny'); "
            "print(json.dumps({'answer': m.answer(), 'file': f, 's': time.perf_counter() - t}))")
    _start_and_kill_mid_compile(code, tmp_path, env, ext_dir)
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the build after an interrupted one hung (waited 300 s)")
    assert r.returncode == 0, r.stderr
    built = _last_json(r.stdout)
    assert built["answer"] == 42 and Path(built["file"]).parent == ext_dir / "mtpspec"
    assert [p.name for p in (ext_dir / "mtpspec").iterdir()] == [Path(built["file"]).name]  # no build dirs left

    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    again = _last_json(r.stdout)
    assert again["answer"] == 42 and again["file"] == built["file"]
    assert not list(ext_dir.rglob("build.ninja"))  # loaded, not compiled again
    assert again["s"] < built["s"]


def test_failed_build_warns_once_with_reason_and_cost(tmp_path):
    """No usable extension (a broken compiler here) means one warning naming the reason and the
    speed cost, the torch path, and kernel_info() saying why."""
    fake_cxx = tmp_path / "broken-c++"
    fake_cxx.write_text("#!/bin/sh\necho 'broken-c++: cannot compile' >&2\nexit 1\n")
    fake_cxx.chmod(0o755)
    env = _env(tmp_path / "ext", MTPSPEC_KERNELS="jit", CXX=str(fake_cxx))
    r = subprocess.run([sys.executable, "-c", INFO], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    info = _last_json(r.stdout)
    assert info["path"] == "torch" and "JIT build" in info["reason"], info
    warnings = [ln for ln in r.stderr.splitlines() if "C++ kernels unavailable" in ln]
    assert len(warnings) == 1, r.stderr
    assert "decoding runs slower" in warnings[0] and "JIT build" in warnings[0]
    assert "pip install --no-build-isolation" in warnings[0]


def test_missing_build_in_an_installed_package_warns(monkeypatch, caplog):
    """An installed package without its compiled extension (and without the C++ source, as in a
    wheel) warns once with both reasons, and runs on torch."""
    monkeypatch.delenv("MTPSPEC_KERNELS", raising=False)
    monkeypatch.setattr(K, "_state", {"ext": None, "tried": False, "error": None, "compile_s": None,
                                      "build": None, "file": None})
    monkeypatch.setattr(K, "PREBUILT", "mtpspec.kernels._no_such_extension")
    monkeypatch.setattr(K, "SOURCE", "/nonexistent/skinny_gemm.cpp")
    with caplog.at_level(logging.WARNING, logger="mtpspec.kernels"):
        assert K._ext() is None
        assert K._ext() is None
    msgs = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(msgs) == 1
    assert "no prebuilt extension" in msgs[0] and "no C++ source" in msgs[0] and "slower" in msgs[0]
    info = K.kernel_info()
    assert info["path"] == "torch" and "no prebuilt extension" in info["reason"]
    assert kernel_summary(info).startswith("torch (no prebuilt extension")


def test_stale_inplace_build_is_not_used(monkeypatch, tmp_path):
    """In a checkout, a skinny_gemm.cpp newer than the in-place build (edited or pulled since
    `bash setup.sh`) makes the prebuilt extension stale: it is skipped (the source gets compiled)."""
    import importlib.util

    spec = importlib.util.find_spec(K.PREBUILT)
    if spec is None:
        pytest.skip("no prebuilt extension (run bash setup.sh)")
    src = tmp_path / "skinny_gemm.cpp"
    src.write_text("// edited\n")
    so_mtime = os.path.getmtime(spec.origin)
    os.utime(src, (so_mtime + 10, so_mtime + 10))
    monkeypatch.setattr(K, "SOURCE", str(src))
    ext, why = K._prebuilt()
    assert ext is None and "older than skinny_gemm.cpp" in why
    os.utime(src, (so_mtime - 10, so_mtime - 10))
    ext, why = K._prebuilt()
    assert ext is not None and why is None and ext.isa() != "none"


def test_checkout_runs_the_prebuilt_extension():
    """After `bash setup.sh` the kernels come from the in-place build, not a run-time compile, and
    the bench tables print which path ran."""
    info = K.kernel_info()
    if os.environ.get("MTPSPEC_KERNELS") or info["path"] != "cpp":
        pytest.skip(f"kernels not on the default C++ path here: {info}")
    if K._prebuilt()[0] is None:
        pytest.skip(f"no usable in-place build: {K._prebuilt()[1]}")
    assert info["build"] == "prebuilt", info
    assert Path(info["file"]).parent == REPO / "mtpspec" / "kernels"
    assert kernel_summary(info) == f"cpp {info['isa']} (prebuilt)"


def test_bench_tables_and_json_report_the_kernel_path(tmp_path, capsys):
    """`mtpspec bench` (plain and spec suites) prints which kernel path ran and records it in the
    JSON (`kernel`: path, build, isa or reason)."""
    from rich.console import Console
    from typer.testing import CliRunner

    from mtpspec.bench import run_plain_bench
    from mtpspec.bench.plain import print_tables
    from mtpspec.cli import app
    from tiny_models import tiny_hf_model

    folder = tmp_path / "tiny"
    tiny_hf_model("llama").save_pretrained(folder)
    expected = kernel_summary(K.kernel_info())

    out = tmp_path / "spec.json"
    res = CliRunner().invoke(app, ["bench", "--suite", "spec", "--model", str(folder), "--drafter", "ngram",
                                   "--draft-tokens", "2", "--modes", "greedy", "--batch-sizes", "1", "-n", "4",
                                   "--repeats", "1", "--no-transformers", "--out", str(out), "--plot",
                                   str(tmp_path / "spec.png")])
    assert res.exit_code == 0, res.output
    assert f"kernel: {expected}" in res.output
    assert json.loads(out.read_text())["kernel"] == K.kernel_info()

    results = run_plain_bench(model=folder, dtypes=("float32",), batch_sizes=(1,), max_new_tokens=4, repeats=1,
                              verify_repeats=1, verify_context=8, bandwidth_mb=8, bandwidth_runs=1,
                              show_table=False)
    assert results["kernel"] == K.kernel_info()
    console = Console(width=400, record=True, file=open(os.devnull, "w"))
    print_tables(results, console=console)
    assert f"kernel: {expected}" in console.export_text()
