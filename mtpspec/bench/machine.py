"""What a benchmark ran on: the machine, its load and memory bandwidth, the software versions and
which matrix-multiplication kernels ran."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from .timing import median, sync


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a load above the core count means other processes competed
    for the CPU during the benchmark, and the timings are unreliable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "memory_gib": None,
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    info["load_average_at_start"] = load_average()
    return info


def versions() -> dict:
    import transformers

    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mtpspec": __version__}


def kernel_info() -> dict:
    """`mtpspec.kernels.kernel_info()` if the kernels package provides it, else a note."""
    try:
        from ..kernels import kernel_info as ki
    except Exception as e:  # noqa: BLE001 - the kernels package may be absent or mid-edit
        return {"path": "unknown", "reason": f"mtpspec.kernels.kernel_info unavailable ({type(e).__name__})"}
    try:
        return dict(ki())
    except Exception as e:  # noqa: BLE001
        return {"path": "unknown", "reason": f"kernel_info() failed: {type(e).__name__}: {e}"}


def kernel_summary(k: dict) -> str:
    """The kernel path of a run for the tables: "cpp avx2 (prebuilt)", "torch (reason)"."""
    if k.get("path") == "cpp":
        return f"cpp {k.get('isa', '')} ({k.get('build') or 'build unknown'})"
    return f"{k.get('path')}{' (' + k['reason'] + ')' if k.get('reason') else ''}"


def environment() -> dict:
    """The `machine`, `versions` and `kernel` entries every benchmark's results record."""
    return {"machine": machine_info(), "versions": versions(), "kernel": kernel_info()}


def measure_read_bandwidth(size_mb: int = 256, runs: int = 10, device: torch.device | str = "cpu") -> dict:
    """Memory-read bandwidth in GB/s (1e9 bytes/s): best of `runs` `torch.sum` over a `size_mb` MB
    fp32 tensor, with torch's current thread count."""
    n = size_mb * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    torch.sum(x)  # touch / warm up
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        torch.sum(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * x.element_size()
    del x
    best = min(times)
    return {"gb_per_s": nbytes / best / 1e9, "bytes": nbytes, "runs": runs, "best_s": best,
            "median_gb_per_s": nbytes / median(times) / 1e9, "threads": torch.get_num_threads(),
            "method": f"torch.sum over a {size_mb} MB fp32 tensor, best of {runs}"}
