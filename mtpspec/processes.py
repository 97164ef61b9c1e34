"""Process helpers shared by the code that leaves per-process work folders behind (GGUF
conversion, the run-time kernel build) and must tell a live owner from a dead one."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
