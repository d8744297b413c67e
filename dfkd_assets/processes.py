"""Whether a process is alive: the one rule, used by the run reaper (defs/runner.py) and the local
fleet (tools/fleet.py). Standard library only."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True when process `pid` exists and is not a zombie.

    A killed child its parent has not waited for yet is a zombie: dead for every purpose here. When
    the process exists (signal 0 reaches it, or it belongs to another user) but /proc cannot tell
    whether it is a zombie, it counts as alive: a live run is never marked failed, and a fleet never
    forgets a process it still has, on a guess."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
