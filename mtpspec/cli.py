"""The `mtpspec` command line, built on the Python API. stdout carries only answers (or JSON);
progress, summaries and errors go to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import MtpspecError
from .prompts_file import read_prompts

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast, lossless text generation with speculative decoding.")

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct).")]
DeviceOpt = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option(help="float32 or bfloat16 (float16 on CUDA).")]
TreeOpt = Annotated[str, typer.Option("--tree", help="MTP drafter: draft a tree of K levels instead of a chain, NODES:BEAM:BRANCH (e.g. 5:1:2: 5 tokens verified per round; the 1 best node of each level expanded into its 2 best children); 'auto' (default) = 6:1:3 while one sampled sequence decodes, chains for greedy sequences and batches (what measured fastest on CPU; see mtpspec.decoding.plan.AUTO_TREE); 'none' = chains.")]
DrafterDtypeOpt = Annotated[str, typer.Option("--drafter-dtype", help="MTP drafter dtype: 'auto' = bfloat16 on CPU (cheaper drafting, same acceptance), the model's dtype elsewhere; or float32 / bfloat16 / float16.")]
DrafterQuantizeOpt = Annotated[str, typer.Option("--drafter-quantize", help="MTP drafter projections: 'auto' = int8 on CPU (cheaper drafting, same acceptance), else none; or none / int8 / int4.")]
QuantizeOpt = Annotated[str, typer.Option("--quantize", help="Target weights: 'auto' = as in the file for a GGUF (the default model's Q4_1 stays 4-bit), dense otherwise; 'gguf' = the GGUF's own quantized matrices; 'int8' / 'int4' = quantized at load time; 'none' = dense in --dtype.")]
LookupOpt = Annotated[bool, typer.Option("--prompt-lookup/--no-prompt-lookup", help="MTP drafter: rows whose last 2+ tokens occurred earlier in the prompt or output draft what followed there instead (free; accepted far more often on text that copies from its context). --no-prompt-lookup = the drafter alone.")]
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Where converted models are cached (default: $MTPSPEC_CACHE or ~/.cache/mtpspec).")]


def _err(msg: str) -> None:
    typer.echo(f"mtpspec: error: {msg}", err=True)


def _read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise MtpspecError("give either a PROMPT argument or --prompts-file (one of them)")
    if prompt is not None:
        return [prompt]
    return read_prompts(prompts_file)


def _summary(stats: dict) -> str:
    spec = ""
    if stats.get("acceptance_per_position"):
        acc = " ".join(f"{a:.2f}" for a in stats["acceptance_per_position"])
        spec = (f", mean accepted length {stats['mean_accepted_length']:.2f}, acceptance per position [{acc}], "
                f"drafter {stats['drafter_time_share'] * 100:.0f}% of time")
    return (f"[{stats['new_tokens']} tokens, {stats['tokens_per_second']:.1f} tok/s decode, "
            f"prefill {stats['prefill_time'] * 1000:.0f} ms, {stats['target_forwards']} target forwards{spec}]")


def _comparison(plain, spec, drafter_name) -> str:
    """One line: plain vs speculative decode speed, and whether the tokens are identical."""
    def rate(results):
        toks = sum(max(r.stats["new_tokens"] - 1, 0) for r in results)
        secs = sum(r.stats["decode_time"] for r in results)
        return toks / secs if secs else 0.0

    p, s = rate(plain), rate(spec)
    same = all(a.token_ids == b.token_ids for a, b in zip(plain, spec))
    mal = sum(r.stats["mean_accepted_length"] for r in spec) / len(spec)
    return (f"plain {p:.1f} tok/s -> speculative ({drafter_name}) {s:.1f} tok/s = {s / p if p else 0:.2f}x, "
            f"mean accepted length {mal:.2f}, identical output: {'yes' if same else 'NO'}")


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (a user message, unless --raw).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts-file", help="One prompt per line, run as a batch.")] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Makes sampling reproducible.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past EOS (kept as an ordinary token) until --max-new-tokens or a stop string.")] = False,
    min_tokens: Annotated[int, typer.Option("--min-tokens", help="No EOS and no stop string within the first N new tokens (EOS masked in the target's distribution).")] = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Decode at most N prompts of a prompts file at a time; a finished prompt's slot goes to the next one.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per prompt per line on stdout.")] = False,
    drafter: Annotated[Optional[str], typer.Option("--drafter", help="MTP drafter checkpoint folder (gemma4_assistant format).")] = None,
    no_drafter: Annotated[bool, typer.Option("--no-drafter", help="Plain decoding, no speculation.")] = False,
    ngram: Annotated[bool, typer.Option("--ngram", help="Model-free n-gram (prompt lookup) drafting.")] = False,
    draft_tokens: Annotated[Optional[int], typer.Option("--draft-tokens", "-k", help="Fixed draft length K (default: adaptive).")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Also run plain decoding first and report the speedup and whether the outputs are identical.")] = False,
    tree: TreeOpt = "auto",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    drafter_dtype: DrafterDtypeOpt = "auto",
    drafter_quantize: DrafterQuantizeOpt = "auto",
    quantize: QuantizeOpt = "auto",
    prompt_lookup: LookupOpt = True,
    cache_dir: CacheOpt = None,
) -> None:
    """Generate text for a prompt (streamed) or a file of prompts (batched).

    With the default model, the drafter shipped with mtpspec (if any) is used unless
    --no-drafter / --drafter / --ngram say otherwise."""
    from .api import load

    try:
        prompts = _read_prompts(prompt, prompts_file)
        if sum([drafter is not None, no_drafter, ngram]) > 1:
            raise MtpspecError("choose at most one of --drafter, --ngram and --no-drafter")
        chosen = None if no_drafter else ("ngram" if ngram else (drafter or "auto"))
        engine = load(model, drafter=chosen, draft_tokens=draft_tokens, draft_tree=tree, device=device, dtype=dtype,
                      drafter_dtype=drafter_dtype, cache_dir=cache_dir, quantize=quantize,
                      prompt_lookup=prompt_lookup, drafter_quantize=drafter_quantize)
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      seed=seed, stop=stop, chat=not raw, ignore_eos=ignore_eos, min_tokens=min_tokens)
        if compare and engine.plan.proposer is None:
            raise MtpspecError("--compare needs a drafter (--drafter PATH or --ngram); none is loaded")
        baseline = None
        if compare:
            typer.echo("running plain decoding first (for the comparison) ...", err=True)
            baseline = engine.plain().generate(prompts, batch_size=batch_size, **kwargs)
        if len(prompts) == 1 and not json_out:
            stream = engine.stream(prompts[0], draft_tokens=draft_tokens, **kwargs)
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            typer.echo(_summary(stream.result.stats), err=True)
            if baseline is not None:
                typer.echo(_comparison([baseline[0]], [stream.result], engine.drafter_name), err=True)
            return
        results = engine.generate(prompts, batch_size=batch_size, draft_tokens=draft_tokens, **kwargs)
        for r in results:
            if json_out:
                sys.stdout.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")
            else:
                sys.stdout.write(r.text + "\n\n")
                typer.echo(_summary(r.stats), err=True)
        if baseline is not None:
            typer.echo(_comparison(baseline, results, engine.drafter_name), err=True)
    except MtpspecError as e:
        _err(str(e))
        raise typer.Exit(2) from None


@app.command()
def bench(
    model: ModelOpt = None,
    suite: Annotated[str, typer.Option(help="plain (ours vs transformers generate), spec (plain vs speculative), "
                                            "gemma4 (Gemma 4-shaped random models), serve (the HTTP server under "
                                            "concurrent clients, with and without the drafter), peers (llama.cpp "
                                            "vs mtpspec on the same GGUF; needs `pip install 'mtpspec\\[peers]'`), "
                                            "or all (all but peers).")] = "plain",
    dtypes: Annotated[str, typer.Option(help="Comma-separated dtypes to measure (plain suite; spec/gemma4 use the first).")] = "float32,bfloat16",
    batch_sizes: Annotated[Optional[str], typer.Option("--batch-sizes", help="Comma-separated batch sizes (default: plain 1,8; spec 1,4,8; gemma4 1,8); serve: concurrent clients (default 1,4,8,16); peers: one size (default 1), llama.cpp decoding that many sequences in one context.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="Tokens per row (default: plain 128, spec 64, gemma4 32, serve 32).")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Interleaved repeats, medians reported (default: peers 2, the other suites 3).")] = None,
    drafter: Annotated[str, typer.Option("--drafter", help="spec/serve suites: MTP drafter checkpoint folder, 'ngram', or 'auto' (the drafter shipped for the default model; without one the spec suite drafts with ngram).")] = "auto",
    draft_tokens: Annotated[str, typer.Option("--draft-tokens", "-k", help="spec suite: draft lengths, e.g. 1,2,4,8,adaptive.")] = "1,2,4,8,adaptive",
    trees: Annotated[Optional[str], typer.Option("--trees", help="spec suite, MTP drafter: also run each K drafting trees of these shapes, e.g. 5:1:2,8:2:3 (NODES:BEAM:BRANCH).")] = None,
    modes: Annotated[str, typer.Option(help="spec suite: greedy,sampled (either or both).")] = "greedy,sampled",
    temperature: Annotated[float, typer.Option(help="spec suite: temperature of the sampled runs.")] = 0.7,
    seed: Annotated[int, typer.Option(help="spec suite: seed of the sampled runs (row i uses seed + i).")] = 0,
    no_transformers: Annotated[bool, typer.Option("--no-transformers", help="spec suite: skip transformers assisted generation.")] = False,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts-file", help="plain/spec suites: prompts to run instead of the built-in chat prompts (.jsonl with a 'prompt' per line, e.g. drafters/heldout-chat.jsonl, or one per line).")] = None,
    heldout: Annotated[bool, typer.Option("--heldout", help="spec suite: run the broad held-out benchmark's prompts (mtpspec/bench/heldout: 12 chat categories, all their prompts by default) and report, per configuration, tau = mean accepted length per category and the unweighted mean over categories (table and JSON runs[].heldout).")] = False,
    categories: Annotated[Optional[str], typer.Option("--categories", help="With --heldout: only these categories, comma-separated (e.g. math,coding); default all.")] = None,
    per_category: Annotated[Optional[int], typer.Option("--per-category", help="With --heldout: the first N prompts of each category (quick runs); default all.")] = None,
    num_prompts: Annotated[Optional[int], typer.Option("--num-prompts", help="spec suite: prompts per run, generated in batches of the batch size (default: one batch = the first B prompts; with --heldout all selected prompts).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the results (single suite; default bench-results/<suite>.json).")] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for the default result files (and the spec plot).")] = Path("bench-results"),
    plot: Annotated[Optional[Path], typer.Option(help="spec/serve/peers suite: PNG plot path (default <out-dir>/<suite>.png).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="peers suite: threads for both engines (default: all cores).")] = None,
    dense: Annotated[bool, typer.Option("--dense", help="peers suite: also run mtpspec on the GGUF dequantized to fp32 (the drafter's acceptance on the dense target).")] = False,
    quantize: Annotated[str, typer.Option("--quantize", help="spec suite: target weights as `generate --quantize` (default 'auto': a GGUF, e.g. the default model, stays quantized; 'none': dense in the first --dtypes).")] = "auto",
    prompt_lookup: Annotated[bool, typer.Option("--prompt-lookup/--no-prompt-lookup", help="spec suite, MTP drafter: prompt lookup in front of the drafter, as generate/serve run it by default (--no-prompt-lookup: the drafter alone).")] = True,
    device: DeviceOpt = "cpu",
    cache_dir: CacheOpt = None,
) -> None:
    """Benchmarks: plain decoding vs transformers (default), speculative vs plain decoding, Gemma 4 shapes."""
    suites = ["plain", "spec", "gemma4", "serve"] if suite == "all" else [suite]
    command = " ".join(["mtpspec"] + sys.argv[1:])
    try:
        if repeats is not None and repeats < 1:
            raise MtpspecError(f"--repeats must be >= 1, got {repeats}")
        if any(s not in ("plain", "spec", "gemma4", "serve", "peers") for s in suites):
            raise MtpspecError(f"--suite must be plain, spec, gemma4, serve, peers or all, got {suite!r}")
        if out is not None and len(suites) > 1:
            raise MtpspecError("--out names one file: with --suite all use --out-dir")
        dts = [d.strip() for d in dtypes.split(",") if d.strip()]
        bs = [int(b) for b in batch_sizes.split(",") if b.strip()] if batch_sizes is not None else None
        prompts = read_prompts(prompts_file) if prompts_file is not None else None
        spec_prompts = _heldout_selection(heldout, categories, per_category, prompts_file, suites) or prompts
        for s in suites:
            target = out if out is not None else out_dir / f"{s}.json"
            reps = repeats or (2 if s == "peers" else 3)
            if s == "plain":
                from .bench.plain import run_plain_bench

                run_plain_bench(model=model, dtypes=dts, batch_sizes=bs or [1, 8], max_new_tokens=max_new_tokens or 128,
                                repeats=reps, out=target, device=device, cache_dir=cache_dir, command=command,
                                prompts=prompts)
            elif s == "spec":
                from .bench.spec import run_spec_bench

                run_spec_bench(model=model, drafter=drafter, dtype=dts[0] if dts else "float32", quantize=quantize,
                               batch_sizes=bs or [1, 4, 8], draft_tokens=draft_tokens,
                               trees=[t.strip() for t in (trees or "").split(",") if t.strip()],
                               modes=[m.strip() for m in modes.split(",") if m.strip()], temperature=temperature,
                               seed=seed, max_new_tokens=max_new_tokens or 64, repeats=reps,
                               transformers_assisted=not no_transformers, out=target, prompts=spec_prompts, num_prompts=num_prompts,
                               plot=plot if plot is not None else out_dir / "spec.png", device=device,
                               cache_dir=cache_dir, command=command, prompt_lookup=prompt_lookup)
            elif s == "serve":
                from .serve.bench import run_serve_bench

                run_serve_bench(concurrency=bs or [1, 4, 8, 16], max_tokens=max_new_tokens or 32, model=model,
                                drafter=drafter, out=target,
                                plot=plot if plot is not None and len(suites) == 1 else out_dir / "serve.png",
                                command=command)
            elif s == "peers":
                if bs and len(bs) > 1:
                    raise MtpspecError(f"--suite peers runs one batch size at a time, got --batch-sizes {batch_sizes}")
                _peers(model, drafter, num_prompts or 8, max_new_tokens or 128, reps,
                       threads, dense, target, plot if plot is not None else out_dir / "peers.png", command,
                       batch=bs[0] if bs else 1)
            else:
                from .bench.gemma4 import run_gemma4_bench

                if model is not None:
                    typer.echo("mtpspec: note: the gemma4 suite builds its own random models; --model is ignored", err=True)
                run_gemma4_bench(dtype=dts[0] if dts else "float32", batch_sizes=bs or [1, 8],
                                 max_new_tokens=max_new_tokens or 32, repeats=reps, out=target, command=command)
    except MtpspecError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    except ValueError as e:
        _err(str(e))
        raise typer.Exit(2) from None


def _heldout_selection(heldout: bool, categories: str | None, per_category: int | None, prompts_file: Path | None,
                       suites: list[str]) -> list | None:
    """The held-out benchmark prompts `bench --heldout` selects (None without --heldout)."""
    if not heldout:
        if categories is not None or per_category is not None:
            raise MtpspecError("--categories and --per-category select held-out benchmark prompts: add --heldout")
        return None
    if suites != ["spec"]:
        raise MtpspecError("--heldout is for --suite spec")
    if prompts_file is not None:
        raise MtpspecError("give --heldout or --prompts-file, not both")
    from .bench.heldout_scores import heldout_prompts

    return heldout_prompts(categories, per_category)


def _peers(model, drafter, n_prompts, new_tokens, repeats, threads, dense, out: Path, plot: Path, command,
           batch: int = 1) -> None:
    from .bench import peers

    if model is not None and not str(model).endswith(".gguf"):
        raise MtpspecError("--suite peers compares engines on one GGUF file: --model must be a .gguf file")
    try:
        record = peers.peers_suite(model, drafter=None if drafter == "none" else drafter, n_prompts=n_prompts,
                                   new_tokens=new_tokens, repeats=repeats, threads=threads, dense=dense,
                                   batch=batch, progress=lambda m: typer.echo(f"  {m}", err=True))
    except peers.PeersUnavailable as e:
        typer.echo(f"mtpspec: peers suite skipped: {e}", err=True)
        return
    record["command"] = command
    for w in record["warnings"]:
        typer.echo(f"mtpspec: warning: {w}", err=True)
    typer.echo(peers.table(record))
    out.parent.mkdir(parents=True, exist_ok=True)
    peers.save(record, out)
    peers.plot(record, plot)
    typer.echo(f"wrote {out} and {plot}", err=True)


@app.command()
def serve(
    model: ModelOpt = None,
    drafter: Annotated[Optional[str], typer.Option("--drafter", help="MTP drafter checkpoint folder, 'ngram' (model-free prompt lookup), 'none', or 'auto' (the drafter shipped for the default model if present, else plain decoding).")] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Sequences decoded together (slots of the running batch).")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a slot; more get HTTP 429.")] = 64,
    max_len: Annotated[int, typer.Option("--max-len", help="Context per sequence, prompt + generated (capped by the model's).")] = 2048,
    draft_tokens: Annotated[Optional[int], typer.Option("--draft-tokens", "-k", help="Fixed draft length K (0 = plain; default: adaptive to acceptance and batch size).")] = None,
    tree: TreeOpt = "auto",
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="Model name clients must use (default: the model's).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    drafter_dtype: DrafterDtypeOpt = "auto",
    drafter_quantize: DrafterQuantizeOpt = "auto",
    quantize: QuantizeOpt = "auto",
    prompt_lookup: LookupOpt = True,
    cache_dir: CacheOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (continuous batching, speculative decoding)."""
    from .api import load

    try:
        engine = load(model, drafter=drafter, draft_tokens=draft_tokens, draft_tree=tree, device=device, dtype=dtype,
                      drafter_dtype=drafter_dtype, cache_dir=cache_dir, quantize=quantize,
                      prompt_lookup=prompt_lookup, drafter_quantize=drafter_quantize)
        from .serve.server import serve as run_server

        typer.echo(f"mtpspec: serving {served_model_name or engine.name} (drafter: {engine.drafter_name or 'none'}) "
                   f"on http://{host}:{port}", err=True)
        run_server(engine, host=host, port=port, max_batch_size=max_batch_size, max_queue=max_queue,
                   max_len=max_len, model_name=served_model_name, log_level=log_level)
    except MtpspecError as e:
        _err(str(e))
        raise typer.Exit(2) from None


from .train.cli import eval_drafter_cmd, train_drafter_cmd  # noqa: E402  (options: mtpspec/train/cli.py)

app.command("train-drafter")(train_drafter_cmd)
app.command("eval-drafter")(eval_drafter_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
