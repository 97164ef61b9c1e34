"""Scores on the broad held-out benchmark (`mtpspec.bench.heldout`): tau per category and the mean
over categories, for `eval-drafter --heldout` and `bench --suite spec --heldout`.

Scoring convention (heldout.py's docstring): tau of a category is its mean accepted length over
all its verification rounds (tokens emitted per round, bonus token included: the per-sequence
counts summed by `AcceptanceTotals`, then divided once), and the headline is the unweighted mean
of the per-category tau (`heldout.mean_over_categories`). Both reports build the same record:

    {"categories": {name: {"prompts": sequences counted, "rounds": verification rounds,
                           "mean_accepted_length": tau, "acceptance_per_position": [...]}, ...},
     "mean_over_categories": unweighted mean of the categories' tau}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..acceptance import AcceptanceTotals, SequenceCounts
from .heldout import Prompt, load_heldout, mean_over_categories

__all__ = ["category_record", "category_totals", "heldout_lines", "heldout_prompts", "heldout_run_record",
           "print_heldout_tables"]


def heldout_prompts(categories: str | Iterable[str] | None = None, per_category: int | None = None) -> list[Prompt]:
    """The selected held-out prompts as one list, category by category (see `load_heldout`;
    an unknown category raises `HeldoutError` listing the valid ones)."""
    return [p for ps in load_heldout(categories, per_category).values() for p in ps]


def category_totals(rows: Iterable[tuple[str, SequenceCounts]], order: Sequence[str] = ()) -> dict[str, AcceptanceTotals]:
    """(category, sequence statistics) pairs summed per category; categories in `order` first
    (present even without a row), then the others as they come."""
    totals = {c: AcceptanceTotals() for c in order}
    for cat, st in rows:
        totals.setdefault(cat, AcceptanceTotals()).add(st)
    return totals


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def category_record(totals: Mapping[str, AcceptanceTotals], k: int | None = None) -> dict:
    """The per-category record (module docstring) of summed counts. k: pad / cut the per-position
    acceptance to K entries (None where nothing was proposed). mean_over_categories is None when a
    category had no verification round (it has no tau)."""
    cats = {}
    for name, t in totals.items():
        acc = t.acceptance_per_position
        if k is not None:
            acc = (acc + [None] * k)[:k]
        cats[name] = {"prompts": t.sequences, "rounds": t.rounds, "mean_accepted_length": _r(t.mean_accepted_length),
                      "acceptance_per_position": [_r(a) for a in acc]}
    taus = [t.mean_accepted_length for t in totals.values()]
    mean = mean_over_categories(taus) if taus and None not in taus else None
    return {"categories": cats, "mean_over_categories": _r(mean)}


def heldout_run_record(runs: Iterable, categories: Sequence[str], k: int | None = None) -> dict:
    """The per-category record of benchmark runs (`bench.timing.Run`s, rows in order) over a prompt
    set whose prompt i has category categories[i]; row j ran prompt j % len(categories). Only rows
    of complete passes through the set count, so every prompt weighs the same (a partial last pass
    only fills the last batch)."""
    n = len(categories)
    rows = []
    for run in runs:
        full = len(run.stats) // n * n
        rows += [(categories[j % n], st) for j, st in enumerate(run.stats[:full])]
    return category_record(category_totals(rows, list(dict.fromkeys(categories))), k)


def _f(x: float | None, spec: str = "{:.3f}") -> str:
    return "-" if x is None else spec.format(x)


def heldout_lines(record: dict) -> list[str]:
    """A plain-text table of a per-category record: prompts, rounds, tau and per-position
    acceptance per category, then the mean over categories."""
    cats = record["categories"]
    w = max([len("mean over categories")] + [len(c) for c in cats])
    lines = [f"  {'category':<{w}} {'prompts':>7} {'rounds':>7} {'tau':>6}  acceptance per position"]
    for name, c in cats.items():
        acc = " ".join(_f(a, "{:.2f}") for a in c["acceptance_per_position"])
        lines.append(f"  {name:<{w}} {c['prompts']:>7} {c['rounds']:>7} {_f(c['mean_accepted_length']):>6}  [{acc}]")
    lines.append(f"  {'mean over categories':<{w}} {'':>7} {'':>7} {_f(record['mean_over_categories']):>6}")
    return lines


def print_heldout_tables(results: dict, console, per_table: int = 8) -> None:
    """The spec bench's per-category tables (rich): a row per category and the mean over
    categories, a column per speculative configuration (at most `per_table` per table)."""
    from rich.table import Table

    runs = [r for r in results["runs"] if r.get("heldout")]
    for start in range(0, len(runs), per_table):
        chunk = runs[start : start + per_table]
        t = Table(title="held-out benchmark: tau (mean accepted length) per category; headline = unweighted "
                        "mean over categories")
        t.add_column("category")
        for r in chunk:
            t.add_column(f"{r['mode']} b{r['batch_size']} K={r.get('config', r['k'])}", justify="right")
        for name in chunk[0]["heldout"]["categories"]:
            t.add_row(name, *(_f(r["heldout"]["categories"][name]["mean_accepted_length"], "{:.2f}") for r in chunk))
        t.add_row("[bold]mean over categories[/]",
                  *(f"[bold]{_f(r['heldout']['mean_over_categories'], '{:.2f}')}[/]" for r in chunk))
        console.print(t)
