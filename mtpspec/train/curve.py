"""The training curve of a drafter: held-out mean accepted length against the run's minutes (what
--time-budget counts: since 2026-12-06 the setup too, writing the first prompts included).

The trainer writes it as `training.png` beside the drafter's `training.json` whenever it writes the
drafter (from the run's evaluations, resumed segments included); `plot_training_curve` redraws it
from any training.json."""

from __future__ import annotations

import json
from pathlib import Path


def curve_points(info: dict) -> list[tuple[float, float]]:
    """(minutes of the run, held-out mean accepted length) of each evaluation in a training.json."""
    return [(e["elapsed"] / 60, e["mean_accepted_length"]) for e in info.get("evals", [])
            if "elapsed" in e and "mean_accepted_length" in e]


def plot_training_curve(info: dict | str | Path, path: str | Path, *, title: str | None = None) -> list | None:
    """Draw the curve of `info` (a training.json's content or its path) into the PNG `path`;
    returns the points drawn, or None (and writes nothing) without evaluations."""
    if not isinstance(info, dict):
        info = json.loads(Path(info).read_text())
    points = curve_points(info)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = info.get("config", {})
    k = cfg.get("draft_tokens")
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ax.plot([m for m, _ in points], [t for _, t in points], marker="o", markersize=3)
    kept = curve_points({"evals": [e for e in info.get("evals", []) if e.get("step") == info.get("kept_step")]})
    mark = kept[-1] if kept else max(points, key=lambda p: p[1])  # the drafter written; older runs: the highest
    ax.annotate(f"{mark[1]:.2f}", mark, textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("minutes of the run")
    ax.set_ylabel(f"held-out mean accepted length{f' (K={k})' if k else ''}")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=1.0)  # 1 = nothing accepted
    ax.grid(alpha=0.3)
    if title is None:
        where = cfg.get("eval_prompts") or "prompts the target wrote, not trained on"
        title = f"{Path(str(cfg.get('target') or 'default model')).name}: evaluated on {where}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return points
