"""One process on one host, named by a heartbeat: is it gone, and fencing it.

A heartbeat names its process by host, pid and start time (harness/health.py): a pid alone can
be reused, so every check here compares the start time too, and nothing is done to a process on
another host (emulated hosts share this machine's pids, so the host name is checked, not the pid).
"""

from __future__ import annotations

import contextlib
from typing import Any

import psutil

SAME_START_S = 0.05  # psutil's create_time is rounded: start times this close name the same process


def gone(subject: dict[str, Any], host: str) -> bool:
    """The named process ran on `host` and has ended (or its pid now names another process)."""
    if subject.get("host") != host:
        return False
    try:
        p = psutil.Process(subject["pid"])
        return abs(p.create_time() - subject["start"]) > SAME_START_S or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill(subject: dict[str, Any], host: str, only_if_stopped: bool = False) -> bool:
    """SIGKILL the named process if it runs on `host` (and, with `only_if_stopped`, is stopped: SIGSTOP,
    a debugger). A frozen process cannot leave by itself, and an elastic agent gives SIGTERM a 30 s
    grace that a stopped process waits out. True if it was killed."""
    if subject.get("host") != host or subject.get("pid") is None:
        return False
    with contextlib.suppress(psutil.Error):
        p = psutil.Process(subject["pid"])
        if abs(p.create_time() - subject["start"]) >= SAME_START_S:
            return False
        if only_if_stopped and p.status() != psutil.STATUS_STOPPED:
            return False
        p.kill()
        return True
    return False
