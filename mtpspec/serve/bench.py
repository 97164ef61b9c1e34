"""Bench of the running server: throughput and per-request latency under concurrent clients.

    run_serve_bench(concurrency=(1, 4, 8, 16), max_tokens=48, drafter="auto")
    mtpspec bench --suite serve [--batch-sizes 1,4,8,16] [-n 32] [--drafter auto]
    python -m mtpspec.serve.bench [--concurrency 1,4,8,16] [--max-tokens 48] [--drafter auto]
                                  [--out bench-results/serve.json] [--plot bench-results/serve.png]

For each configuration (the server with its drafter, and the same weights without one) a real
server runs on 127.0.0.1 (uvicorn in a thread of this process); both servers exist from the start
and the configurations alternate at every concurrency level, so a change in the machine's load
hits both alike. At concurrency C, C clients each send requests back to back (streaming chat
completions, greedy, the built-in benchmark prompts, cycled) until 2*C requests (at least 4) have
completed. Reported per level: generated tokens / wall time (throughput), and per-request latency
(mean, p50, p90 of request start to last token) and time to first token. `--url` benches an
already running server instead (one configuration, named "external").

Prints a table, writes JSON and a PNG plot. Timings depend on the machine and its other load;
the load averages at start and end are recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import httpx

from ..bench.machine import kernel_info, kernel_summary, load_average
from ..bench.prompts import CHAT_PROMPTS
from ..bench.records import recorded_command

DEFAULT_OUT = Path("bench-results/serve.json")
DEFAULT_PLOT = Path("bench-results/serve.png")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def one_request(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if ttft is None and obj.get("choices") and obj["choices"][0].get("token_ids"):
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                usage = obj["usage"]
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": ttft if ttft is not None else latency,
            "tokens": usage["completion_tokens"] if usage else 0}


def run_level(url: str, model: str, concurrency: int, max_tokens: int, n_requests: int) -> dict:
    lock = threading.Lock()
    next_i = [0]
    results: list[dict] = []
    errors: list[str] = []

    def client_loop():
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    i = next_i[0]
                    if i >= n_requests:
                        return
                    next_i[0] += 1
                try:
                    res = one_request(c, model, CHAT_PROMPTS[i % len(CHAT_PROMPTS)], max_tokens)
                except Exception as e:  # reported, not fatal
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results] or [0.0]
    ttft = [r["ttft"] for r in results] or [0.0]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "errors": errors, "tokens": tokens,
            "wall_s": round(wall, 3), "throughput_tok_s": round(tokens / wall, 2) if wall else 0.0,
            "latency_mean_s": round(statistics.mean(lat), 3), "latency_p50_s": round(_pct(lat, 0.5), 3),
            "latency_p90_s": round(_pct(lat, 0.9), 3), "ttft_mean_s": round(statistics.mean(ttft), 3),
            "tokens_per_request": round(tokens / max(1, len(results)), 1)}


def _scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name in ("mtpspec_mean_accepted_length", "mtpspec_draft_tokens_proposed_total",
                          "mtpspec_draft_tokens_accepted_total"):
                out[s.name] = s.value
    return out


def plot_serve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results["configs"].items():
        cs = [r["concurrency"] for r in rows]
        a.plot(cs, [r["throughput_tok_s"] for r in rows], marker="o", label=name)
        b.plot(cs, [r["latency_mean_s"] for r in rows], marker="o", label=f"{name} (mean)")
        b.plot(cs, [r["ttft_mean_s"] for r in rows], marker="x", linestyle=":", label=f"{name} (first token)")
    a.set(xlabel="concurrent clients", ylabel="generated tokens / s", title="Throughput", xscale="log", xticks=[])
    b.set(xlabel="concurrent clients", ylabel="seconds per request", title="Latency", xscale="log")
    for ax in (a, b):
        cs = sorted({r["concurrency"] for rows in results["configs"].values() for r in rows})
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"mtpspec serve: {results['model']}, max_tokens={results['max_tokens']}, greedy", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    head = "| config | clients | requests | tokens | throughput (tok/s) | latency mean / p50 / p90 (s) | first token (s) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results["configs"].items():
        for r in rows:
            lines.append(f"| {name} | {r['concurrency']} | {r['requests']} | {r['tokens']} | {r['throughput_tok_s']:.1f} "
                         f"| {r['latency_mean_s']:.2f} / {r['latency_p50_s']:.2f} / {r['latency_p90_s']:.2f} "
                         f"| {r['ttft_mean_s']:.2f} |")
    return "\n".join(lines)


class _Server(NamedTuple):
    name: str  # the configuration's name in the results
    url: str
    model: str
    stop: Callable[[], None] | None


def _external_server(url: str, results: dict) -> _Server:
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    results["model"] = model
    results["kernel"] = {"path": "unknown", "reason": "an external server"}
    return _Server("external", url.rstrip("/"), model, None)


def _own_servers(model: str | None, drafter: str, max_batch_size: int, results: dict) -> list[_Server]:
    """Two servers in this process over the same weights: with the drafter and without one."""
    import mtpspec

    from ..decoding.plan import resolve_drafter
    from .server import ServerThread, build

    spec = mtpspec.load(model, drafter=resolve_drafter(model, drafter) or "ngram")
    plain = spec.plain()
    results["model"] = spec.name
    results["kernel"] = kernel_info()
    servers = []
    for name, eng in ((f"drafter: {spec.drafter_name}", spec), ("no drafter", plain)):
        served = build(eng, max_batch_size=max_batch_size, max_queue=256, max_len=1024)
        srv = ServerThread(served.app).start()
        servers.append(_Server(name, srv.url, eng.name, lambda s=srv, sv=served: (s.stop(), sv.scheduler.stop())))
    return servers


def _run_levels(servers: list[_Server], concurrency: Sequence[int], max_tokens: int, results: dict) -> None:
    """A warm-up request per server, then each concurrency level on every server in turn."""
    for srv in servers:  # warm-up (not counted)
        run_level(srv.url, srv.model, 1, 8, 1)
        results["configs"][srv.name] = []
    for c in concurrency:
        for srv in servers:
            print(f"[bench] {srv.name}: {c} clients ...", file=sys.stderr, flush=True)
            row = run_level(srv.url, srv.model, c, max_tokens, max(4, 2 * c))
            results["configs"][srv.name].append(row)
            print(f"[bench]   {row['throughput_tok_s']} tok/s, mean latency {row['latency_mean_s']} s",
                  file=sys.stderr, flush=True)
    for srv in servers:
        results["spec_stats"][srv.name] = _scrape(srv.url)


def run_serve_bench(*, concurrency: Sequence[int] = (1, 4, 8, 16), max_tokens: int = 48, model: str | None = None,
                    drafter: str = "auto", max_batch_size: int = 16, url: str | None = None,
                    out: str | Path = DEFAULT_OUT, plot: str | Path = DEFAULT_PLOT,
                    command: str | None = None) -> dict:
    """Bench servers under `concurrency` concurrent clients (see the module docstring); prints a
    table, writes the results as JSON to `out` and a PNG plot to `plot`, and returns the results.

    model: checkpoint folder or .gguf (None = the default model). drafter: of the speculative
    configuration (auto, ngram, a folder). url: bench this running server instead of starting
    ours. command: the command line recorded in the results (default: this process's argv).
    """
    out, plot = Path(out), Path(plot)
    results = {"command": recorded_command(command),
               "max_tokens": max_tokens, "load_average_at_start": load_average(), "configs": {}, "spec_stats": {}}
    servers = [_external_server(url, results)] if url else _own_servers(model, drafter, max_batch_size, results)
    try:
        _run_levels(servers, concurrency, max_tokens, results)
    finally:
        for srv in servers:
            if srv.stop:
                srv.stop()
    results["load_average_at_end"] = load_average()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot_serve(results, plot)
    print(table(results))
    print(f"\nkernel: {kernel_summary(results['kernel'])}")
    print(f"load average at start {results['load_average_at_start']}, at end {results['load_average_at_end']}; "
          f"spec stats {results['spec_stats']}")
    print(f"wrote {out} and {plot}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None, command: str | None = None) -> dict:
    """`python -m mtpspec.serve.bench [options]`: the command line of `run_serve_bench`."""
    ap = argparse.ArgumentParser(prog="python -m mtpspec.serve.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client counts")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--model", default=None, help="checkpoint folder or .gguf (default model if omitted)")
    ap.add_argument("--drafter", default="auto", help="drafter of the speculative configuration (auto, ngram, folder)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--url", default=None, help="bench this running server instead of starting ours")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = ap.parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    return run_serve_bench(concurrency=[int(c) for c in args.concurrency.split(",") if c.strip()],
                           max_tokens=args.max_tokens, model=args.model, drafter=args.drafter,
                           max_batch_size=args.max_batch_size, url=args.url, out=args.out, plot=args.plot,
                           command=command or "python -m mtpspec.serve.bench " + " ".join(argv))


if __name__ == "__main__":
    main()
