"""The benchmarks' records: rounding, token comparison, the results file and the tables' console.

Progress goes to stderr (`log`); tables go to stdout.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..errors import MtpspecError


class BenchMismatch(MtpspecError):
    """Greedy tokens that must be identical differ (raised after the results are written)."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rounded(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def fmt(x, spec: str) -> str:
    """A table cell: `spec` applied to x, "-" for None."""
    return "-" if x is None else spec.format(x)


def recorded_command(command: str | None) -> str:
    """The command line to record: the caller's, else this process's argv."""
    return command if command is not None else shlex.join(sys.argv)


def compare_tokens(ours: list[list[int]], ref: list[list[int]]) -> dict:
    """Row-by-row comparison: identical rows, the first differing position of each row, the fraction
    of tokens before the first divergence, and the fraction of equal positions."""
    first_diff: list[int | None] = []
    prefix = same = total = 0
    for a, b in zip(ours, ref):
        n = max(len(a), len(b))
        d = next((i for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]), None)
        first_diff.append(d)
        prefix += n if d is None else d
        same += sum(1 for x, y in zip(a, b) if x == y)
        total += n
    return {
        "identical": all(d is None for d in first_diff) and len(ours) == len(ref),
        "rows": len(ours),
        "first_divergence": first_diff,
        "identical_prefix_fraction": prefix / total if total else 1.0,
        "identical_position_fraction": same / total if total else 1.0,
    }


def write_results(results: dict, out: str | Path | None) -> None:
    """Write the results as JSON to `out` (parent folders created; None = nowhere); the path is
    recorded in results["out"]."""
    if out is None:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    results["out"] = str(path)
    log(f"wrote {path}")


def table_console(console=None, width: int = 150):
    """`console`, else a rich console on stdout (`width` columns wide when stdout is a file or pipe,
    so that the tables are not squeezed into 80 columns)."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=width)
    return console


def print_load_warning(console, machine: dict) -> None:
    """Warn when the load average exceeded the core count at the start or end of the run."""
    loads = [x for x in (machine.get("load_average_at_start"), machine.get("load_average_at_end")) if x]
    if loads and machine.get("logical_cores") and max(x[0] for x in loads) > machine["logical_cores"] + 0.5:
        console.print(f"[yellow]warning: load average {' -> '.join(str(x[0]) for x in loads)} on "
                      f"{machine['logical_cores']} cores: other processes competed for the CPU; timings are unreliable[/]")
