"""`run_spec_bench` and `run_gemma4_bench` end to end on tiny random models (no timing thresholds)."""

from __future__ import annotations

import json
import math

import pytest

from mtpspec.bench.gemma4 import run_gemma4_bench
from mtpspec.bench.spec import parse_draft_tokens, run_spec_bench
from mtpspec.errors import InputError

from tiny_models import tiny_hf_model

FAST = dict(max_new_tokens=10, repeats=1, cost_repeats=2, show_table=False)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    return folder


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_parse_draft_tokens():
    assert parse_draft_tokens("1,2, 4,adaptive") == [1, 2, 4, None]
    assert parse_draft_tokens([3, None, 3]) == [3, None]
    for bad in ("0", "x", ""):
        with pytest.raises(InputError):
            parse_draft_tokens(bad)


def test_spec_bench_ngram_json_plot_identity(tiny_llama, tmp_path, capsys):
    out, png = tmp_path / "r" / "spec.json", tmp_path / "r" / "spec.png"
    # repetitive prompts so that the n-gram proposer gets accepted drafts
    prompts = [[5, 6, 7, 8] * 6, [9, 10, 11] * 8, list(range(20, 50))]
    res = run_spec_bench(model=tiny_llama, drafter="ngram", batch_sizes=(1, 3), draft_tokens="2,adaptive",
                         prompts=prompts, out=out, plot=png, command="pytest", **{**FAST, "show_table": True})
    data = json.loads(out.read_text())
    for key in ("benchmark", "model", "drafter", "command", "arguments", "machine", "versions", "kernel", "runs",
                "transformers", "step_costs", "greedy_tokens_identical", "notes", "plot"):
        assert key in data, key
    assert data["benchmark"] == "spec" and data["command"] == "pytest"
    assert data["drafter"]["kind"] == "ngram"
    assert data["greedy_tokens_identical"] is True
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["mode"], r["batch_size"], r["k"]) for r in data["runs"]] == [
        (m, b, k) for m in ("greedy", "sampled") for b in (1, 3) for k in ("2", "adaptive")]
    for r in data["runs"]:
        for key in ("plain_tok_s", "spec_tok_s", "speedup", "mean_accepted_length"):
            assert _positive(r[key]), (key, r)
        assert 1.0 <= r["mean_accepted_length"] <= 3.0 or r["k"] == "adaptive"
        assert all(a is None or 0 <= a <= 1 for a in r["acceptance_per_position"])
        if r["mode"] == "greedy":
            assert r["tokens_identical_to_plain"] is True
        else:
            assert r["tokens_identical_to_plain"] is None
    greedy_k2 = [r for r in data["runs"] if r["mode"] == "greedy" and r["k"] == "2"]
    assert any(r["mean_accepted_length"] > 1.0 for r in greedy_k2)  # repetitive prompts: some accepted
    # transformers: plain and prompt lookup at batch 1, greedy; prompt lookup is lossless there too
    whats = [r["what"] for r in data["transformers"]]
    assert whats[0] == "plain generate" and whats[1].startswith("prompt lookup")
    assert all(r["hf_tokens_equal_hf_plain"] for r in data["transformers"])
    assert data["transformers"][0]["hf_tokens_equal_ours_plain"] is True
    # step costs per batch size
    assert [c["batch_size"] for c in data["step_costs"]] == [1, 3]
    for c in data["step_costs"]:
        assert _positive(c["target_1_ms"])
        assert [v["k"] for v in c["verify"]] == [2] and _positive(c["verify"][0]["ratio_to_1"])
        assert [d["k"] for d in c["draft"]] == [2] and _positive(c["draft"][0]["per_token_vs_target_step"])
    assert res["out"] == str(out)
    printed = capsys.readouterr().out
    assert "plain vs speculative" in printed and "transformers at batch 1" in printed and "step costs" in printed


def test_spec_bench_mtp_drafter_greedy_only(tiny_llama, tmp_path):
    """A random MTP drafter saved in the gemma4_assistant format: nothing is accepted, output still
    identical; transformers cannot run it for a llama target, which is reported."""
    from mtpspec.checkpoint import load_decoder
    from mtpspec.drafter_checkpoint import save_drafter
    from mtpspec.models.drafter import DrafterConfig, MTPDrafter

    target = load_decoder(tiny_llama)
    drafter = MTPDrafter(DrafterConfig.for_target(target.cfg, num_layers=1, hidden_size=32)).init_random(0, std=0.2)
    save_drafter(drafter, tmp_path / "drafter", draft_tokens=2)
    res = run_spec_bench(model=tiny_llama, drafter=tmp_path / "drafter", batch_sizes=(1, 2), draft_tokens=[3],
                         modes=("greedy",), out=None, plot=None, **FAST)
    assert res["greedy_tokens_identical"] is True
    assert res["drafter"]["kind"] == "mtp"
    assert "only for Gemma 4" in res["transformers_assistant_error"]
    pl = next(r for r in res["transformers"] if r["what"].startswith("prompt lookup"))
    assert pl["ours"] == "ours_ngram" and _positive(pl["ours_tok_s"])
    assert all(_positive(c["draft"][0]["per_token_ms"]) for c in res["step_costs"])


def test_spec_bench_draft_trees(tiny_llama, tmp_path):
    """Tree configurations run next to the chains (greedy and sampled), greedy identical to plain, labelled."""
    from mtpspec.checkpoint import load_decoder
    from mtpspec.drafter_checkpoint import save_drafter
    from mtpspec.models.drafter import DrafterConfig, MTPDrafter

    target = load_decoder(tiny_llama)
    drafter = MTPDrafter(DrafterConfig.for_target(target.cfg, num_layers=1, hidden_size=32)).init_random(1, std=0.2)
    save_drafter(drafter, tmp_path / "drafter", draft_tokens=2)
    res = run_spec_bench(model=tiny_llama, drafter=tmp_path / "drafter", batch_sizes=(1, 2), draft_tokens="2,adaptive",
                         trees=["4:1:2"], transformers_assisted=False, out=tmp_path / "s.json", plot=tmp_path / "s.png",
                         **FAST)
    assert res["greedy_tokens_identical"] is True
    for mode in ("greedy", "sampled"):
        got = {(r["batch_size"], r["config"]) for r in res["runs"] if r["mode"] == mode}
        assert got == {(b, c) for b in (1, 2) for c in ("2", "adaptive", "2 tree 4:1:2", "adaptive tree 4:1:2")}
    assert {r["tree"] for r in res["runs"]} == {None, "4:1:2"}
    assert res["arguments"]["trees"] == ["4:1:2"] and (tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(InputError, match="MTP drafter"):
        run_spec_bench(model=tiny_llama, drafter="ngram", trees=["4"], out=None, plot=None, **FAST)
    with pytest.raises(InputError, match="draft tree"):
        run_spec_bench(model=tiny_llama, drafter=tmp_path / "drafter", trees=["4:x"], out=None, plot=None, **FAST)


def test_spec_bench_bad_arguments(tiny_llama):
    with pytest.raises(InputError):
        run_spec_bench(model=tiny_llama, modes=("beam",), out=None, plot=None, **FAST)
    with pytest.raises(InputError):
        run_spec_bench(model=tiny_llama, batch_sizes=(0,), out=None, plot=None, **FAST)


def test_gemma4_bench_tiny(tmp_path):
    out = tmp_path / "gemma4.json"
    res = run_gemma4_bench(tiny=True, out=out, repeats=1, max_new_tokens=6, prompt_tokens=10, moe_steps=2,
                           show_table=False, command="pytest")
    data = json.loads(out.read_text())
    assert data["benchmark"] == "gemma4" and data["command"] == "pytest"
    assert [r["batch_size"] for r in data["dense"]["runs"]] == [1, 8]
    assert all(_positive(r["tok_s"]) for r in data["dense"]["runs"])
    assert _positive(data["dense"]["params"]) and _positive(data["dense"]["weight_bytes_per_step"])
    rows = data["moe"]["widening"]
    assert [(r["batch_size"], r["k"]) for r in rows] == [(b, k) for b in (1, 4, 8) for k in (0, 4)]
    e, top = data["moe"]["num_experts"], data["moe"]["top_k_experts"]
    for r in rows:
        assert top <= r["experts_per_layer"] <= min(e, top * r["tokens_per_forward"])
    b1k0 = next(r for r in rows if r["batch_size"] == 1 and r["k"] == 0)
    assert b1k0["experts_per_layer"] == top  # one token reads exactly top-k experts
    assert res["out"] == str(out)


def test_cli_bench_spec_suite(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from mtpspec.cli import app

    out, png = tmp_path / "spec.json", tmp_path / "spec.png"
    res = CliRunner().invoke(app, ["bench", "--suite", "spec", "--model", str(tiny_llama), "--drafter", "ngram",
                                   "--draft-tokens", "2", "--modes", "greedy", "--batch-sizes", "1,2", "-n", "6",
                                   "--repeats", "1", "--no-transformers", "--out", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["command"].startswith("mtpspec") and data["transformers"] == []
    assert [(r["batch_size"], r["k"]) for r in data["runs"]] == [(1, "2"), (2, "2")]
    assert png.exists()
    bad = CliRunner().invoke(app, ["bench", "--suite", "nope"])
    assert bad.exit_code == 2


def test_spec_bench_gemma4_target_runs_transformers_assistant(tmp_path):
    """For a Gemma 4 target with an MTP drafter checkpoint, transformers' assisted generation with
    the drafter as `assistant_model` runs at batch 1 and gives plain greedy's tokens."""
    from drafter_helpers import random_drafter
    from gemma4_configs import tiny_gemma4

    from mtpspec.checkpoint import load_decoder
    from mtpspec.drafter_checkpoint import save_drafter

    tiny_gemma4("e2b").save_pretrained(tmp_path / "target")
    save_drafter(random_drafter(load_decoder(tmp_path / "target")), tmp_path / "drafter", draft_tokens=2)
    res = run_spec_bench(model=tmp_path / "target", drafter=tmp_path / "drafter", batch_sizes=(1,), draft_tokens=[2],
                         modes=("greedy",), out=None, plot=None, **FAST)
    assert res["greedy_tokens_identical"] is True
    assert "transformers_assistant_error" not in res and "transformers_errors" not in res
    row = next(r for r in res["transformers"] if r["what"].startswith("Gemma 4 assistant"))
    assert row["hf_tokens_equal_hf_plain"] and row["ours"] == "spec_2" and _positive(row["hf_tok_s"])


def test_spec_bench_records_a_failing_configuration(tiny_llama, monkeypatch):
    """A speculative configuration that raises is recorded under `errors` and dropped; plain
    decoding and the other measurements survive."""
    from mtpspec.decoding.proposers import NgramProposer

    def boom(self, inp, k):
        raise RuntimeError("proposer broke")

    monkeypatch.setattr(NgramProposer, "propose", boom)
    res = run_spec_bench(model=tiny_llama, drafter="ngram", batch_sizes=(2,), draft_tokens="2", modes=("greedy",),
                         out=None, plot=None, **FAST)
    assert res["runs"] == []
    assert any("spec_2" in name and "proposer broke" in err for name, err in res["errors"].items())
    assert "step costs batch 2" in res["errors"]


def test_batches_for_covers_the_prompt_set_in_batches():
    from mtpspec.bench.spec import batches_for

    ps = [[1], [2], [3]]
    assert batches_for(ps, 2, None) == [[[1], [2]]]  # default: one batch
    assert batches_for(ps, 1, 3) == [[[1]], [[2]], [[3]]]
    assert batches_for(ps, 2, 3) == [[[1], [2]], [[3], [1]]]  # rounded up to full batches, cycled
    assert batches_for(ps, 4, 2) == [[[1], [2], [3], [1]]]


def test_spec_bench_runs_several_batches_per_run(tiny_llama):
    prompts = [[5, 6, 7, 5, 6, 7], [8, 9, 10, 11], [12, 13, 12, 13, 12], [20, 21, 22]]
    res = run_spec_bench(model=tiny_llama, drafter="ngram", batch_sizes=(1, 2), draft_tokens="2", modes=("greedy",),
                         prompts=prompts, num_prompts=4, transformers_assisted=False, out=None, plot=None, **FAST)
    assert res["greedy_tokens_identical"] is True
    runs = {r["batch_size"]: r for r in res["runs"]}
    assert runs[1]["batches_per_run"] == 4 and runs[2]["batches_per_run"] == 2
    assert runs[1]["prompt_tokens"] == runs[2]["prompt_tokens"] == [6, 4, 5, 3]
    with pytest.raises(InputError, match="num_prompts"):
        run_spec_bench(model=tiny_llama, num_prompts=0, out=None, plot=None, **FAST)


def test_cli_bench_serve_suite(tiny_with_tokenizer, tmp_path):
    """`mtpspec bench --suite serve`: two real servers (with the drafter and without) under 1 and 2
    concurrent clients; every request completes; the JSON records this command and the kernel path."""
    from typer.testing import CliRunner

    from mtpspec.cli import app

    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    res = CliRunner().invoke(app, ["bench", "--suite", "serve", "--model", str(tiny_with_tokenizer), "--drafter", "ngram",
                                   "--batch-sizes", "1,2", "-n", "4", "--out", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["command"].startswith("mtpspec ")  # the mtpspec command line, not python -m ...
    assert set(data["configs"]) == {"drafter: ngram", "no drafter"}
    for rows in data["configs"].values():
        assert [r["concurrency"] for r in rows] == [1, 2]
        assert all(r["requests"] == 4 and not r["errors"] and _positive(r["throughput_tok_s"]) for r in rows)
    assert png.exists()
    from mtpspec.bench.machine import kernel_summary
    from mtpspec.kernels import kernel_info

    assert data["kernel"] == kernel_info() and f"kernel: {kernel_summary(kernel_info())}" in res.output


def test_spec_bench_runs_a_gguf_target_as_users_load_it(tmp_path, monkeypatch):
    """The spec suite loads the target as `load` does: a GGUF stays quantized by default (the
    default model runs from its Q4_1 file), `quantize="none"` dequantizes it; the record says which."""
    from test_default_model import write_tiny_gguf

    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "t.gguf", hidden=64, ffn=128, weight_types={"*": "Q8_0"})
    prompts = [[5, 6, 7, 8] * 6, [9, 10, 11] * 8]
    kw = dict(drafter="ngram", batch_sizes=(1,), draft_tokens="2", modes=("greedy",), prompts=prompts,
              transformers_assisted=False, out=None, plot=None, **FAST)
    quant = run_spec_bench(model=gguf, **kw)
    assert "Q8_0" in quant["model"]["quantization"] and quant["greedy_tokens_identical"] is True
    assert run_spec_bench(model=gguf, quantize="none", **kw)["model"]["quantization"] is None
